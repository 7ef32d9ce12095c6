//! `docs/CONFIG.md`, the configuration reference, generated from this crate's own source and
//! checked by a test: the keys and descriptions come from the sections' fields and their `///`
//! comments in `config.rs` (its text, read at compile time), the defaults from
//! `Config::default()` serialized as TOML, the flags from the `(shorthand for --set KEY=...)`
//! notes of the CLI flags. A page that differs from the code fails the test; to rewrite it:
//!
//! ```text
//! REGENERATE_CONFIG_DOCS=1 cargo test -p parley-broker config_reference
//! ```

use super::{Config, ENV_PREFIX};

/// The source the reference is read from.
const CONFIG_SOURCE: &str = include_str!("../config.rs");
/// The CLI sources whose flag comments name the keys they are shorthands for.
const CLI_SOURCES: &[&str] = &[
    include_str!("../cli/mod.rs"),
    include_str!("../cli/serve.rs"),
];
/// Where the page lives, from the crate's directory.
const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIG.md");
/// Set (to anything) to rewrite the page instead of checking it.
const REGENERATE_VAR: &str = "REGENERATE_CONFIG_DOCS";
/// The one-line command that rewrites the page.
const REGENERATE_COMMAND: &str =
    "REGENERATE_CONFIG_DOCS=1 cargo test -p parley-broker config_reference";

/// A `pub struct` of `config.rs` with named fields.
struct Struct {
    name: String,
    doc: String,
    fields: Vec<Field>,
}

/// One field of a [`Struct`].
struct Field {
    name: String,
    ty: String,
    doc: String,
}

/// Joins `///` lines into one paragraph.
fn join_doc(lines: &[&str]) -> String {
    lines.join(" ").trim().to_owned()
}

/// The `pub struct`s with named fields of `source`, in source order, each field with its doc
/// comment. A field without one is an error.
fn parse_structs(source: &str) -> Result<Vec<Struct>, String> {
    let mut out = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let mut lines = source.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
            continue;
        }
        if line.starts_with("#[") {
            continue;
        }
        let Some(name) = line
            .strip_prefix("pub struct ")
            .and_then(|rest| rest.strip_suffix(" {"))
        else {
            doc.clear();
            continue;
        };
        let mut s = Struct {
            name: name.trim().to_owned(),
            doc: join_doc(&doc),
            fields: Vec::new(),
        };
        doc.clear();
        let mut field_doc: Vec<&str> = Vec::new();
        for (n, line) in lines.by_ref() {
            let t = line.trim();
            if line == "}" {
                break;
            } else if let Some(text) = t.strip_prefix("///") {
                field_doc.push(text.trim());
            } else if t.starts_with("#[") || t.is_empty() {
            } else if let Some((field, ty)) = t
                .strip_prefix("pub ")
                .and_then(|f| f.strip_suffix(','))
                .and_then(|f| f.split_once(": "))
            {
                if field_doc.is_empty() {
                    return Err(format!(
                        "config.rs line {}: field `{}.{field}` has no doc comment; every setting \
                         needs one (its meaning and default), it is the reference's description",
                        n + 1,
                        s.name
                    ));
                }
                s.fields.push(Field {
                    name: field.to_owned(),
                    ty: ty.to_owned(),
                    doc: join_doc(&field_doc),
                });
                field_doc.clear();
            } else {
                return Err(format!(
                    "config.rs line {}: cannot read `{t}` in `pub struct {}` (expected `/// doc`, \
                     `#[attr]` or `pub name: Type,` on one line)",
                    n + 1,
                    s.name
                ));
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// The keys named by `(shorthand for --set KEY=...)` in the doc comments of the `#[arg(long)]`
/// fields of `sources`, with their flags (`--field-name`).
fn flag_shorthands(sources: &[&str]) -> Vec<(String, String)> {
    const NOTE: &str = "shorthand for --set ";
    let mut out = Vec::new();
    for source in sources {
        let mut doc = String::new();
        let mut long = false;
        for line in source.lines().map(str::trim) {
            if let Some(text) = line.strip_prefix("///") {
                doc.push_str(text.trim());
                doc.push(' ');
            } else if line.starts_with("#[arg(long") {
                long = true;
            } else if line.starts_with("#[") {
            } else {
                let field = line
                    .strip_prefix("pub(super) ")
                    .unwrap_or(line)
                    .split_once(':')
                    .map(|(f, _)| f.trim());
                if let (true, Some(field), Some((_, rest))) = (long, field, doc.split_once(NOTE)) {
                    let key: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                        .collect();
                    out.push((key, format!("--{}", field.replace('_', "-"))));
                }
                doc.clear();
                long = false;
            }
        }
    }
    out
}

/// A markdown table cell: no `|` or line break may end it early.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// One table of settings: `prefix` is `"section."` or empty for the top-level settings.
fn table(
    out: &mut String,
    prefix: &str,
    fields: &[&Field],
    defaults: &toml::Table,
    flags: &[(String, String)],
) -> Result<(), String> {
    out.push_str("| Key | Default | Environment variable | `serve` flag | Description |\n");
    out.push_str("|---|---|---|---|---|\n");
    for f in fields {
        let key = format!("{prefix}{}", f.name);
        let value = defaults.get(&f.name);
        let default = if f.ty.contains("Secret") {
            match value {
                None => "(unset)".to_owned(),
                Some(_) => "(redacted)".to_owned(),
            }
        } else {
            match value {
                Some(v) => format!("`{v}`"),
                None if f.ty.starts_with("Option<") => "(unset)".to_owned(),
                None => return Err(format!("`{key}` is missing from the serialized defaults")),
            }
        };
        let env = format!(
            "`{ENV_PREFIX}{}`",
            key.to_ascii_uppercase().replace('.', "__")
        );
        let flag: Vec<String> = flags
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, flag)| format!("`{flag}`"))
            .collect();
        out.push_str(&format!(
            "| `{key}` | {} | {env} | {} | {} |\n",
            cell(&default),
            flag.join(", "),
            cell(&f.doc)
        ));
    }
    Ok(())
}

/// The whole page.
fn render() -> Result<String, String> {
    let structs = parse_structs(CONFIG_SOURCE)?;
    let find = |name: &str| structs.iter().find(|s| s.name == name);
    let config = find("Config").ok_or("no `pub struct Config` in config.rs")?;
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        other => return Err(format!("Config::default() is not a TOML table: {other:?}")),
    };
    let flags = flag_shorthands(CLI_SOURCES);

    let mut out = String::new();
    out.push_str(&format!(
        "<!-- Generated from broker/src/config.rs by a test; do not edit by hand. \
         Regenerate: {REGENERATE_COMMAND} -->\n\n"
    ));
    out.push_str(
        "# Configuration reference\n\n\
         Every setting of a node, with its default. Settings apply in layers, each overriding the \
         one before: the defaults below; a TOML file (`broker serve --config parley.toml`, same \
         shape as this page: top-level keys, then one `[section]` table per section); environment \
         variables `PARLEY_<SECTION>__<KEY>` (or `PARLEY_<KEY>` for a top-level key); then \
         `--set section.key=value` flags and the named flags of `broker serve`, which are \
         shorthands for the same keys (`--data-dir` is shared by every command that reads the \
         configuration). Values from the environment and flags are read as TOML values (`64`, \
         `true`, `\"text\"`); a bare word that is not valid TOML is a string. Unknown keys are an \
         error. The node prints its effective configuration, secrets redacted, at start-up.\n\n\
         `--no-tcp` and `--no-ws` are `--tcp none` and `--ws none`; `(unset)` means the setting \
         has no value unless one is given.\n",
    );

    let (sections, top): (Vec<&Field>, Vec<&Field>) =
        config.fields.iter().partition(|f| find(&f.ty).is_some());
    out.push_str("\n## Top-level settings\n\n");
    table(&mut out, "", &top, &defaults, &flags)?;
    for section in sections {
        let s = find(&section.ty).ok_or("unreachable: partitioned on it")?;
        let section_defaults = match defaults.get(&section.name) {
            Some(toml::Value::Table(t)) => t.clone(),
            other => {
                return Err(format!(
                    "default of `{}` is not a table: {other:?}",
                    section.name
                ));
            }
        };
        if let Some(key) = section_defaults
            .keys()
            .find(|k| !s.fields.iter().any(|f| &f.name == *k))
        {
            return Err(format!(
                "`{}.{key}` is in the defaults but was not read from `pub struct {}`",
                section.name, s.name
            ));
        }
        out.push_str(&format!("\n## `[{}]`\n\n{}\n\n", section.name, s.doc));
        let fields: Vec<&Field> = s.fields.iter().collect();
        table(
            &mut out,
            &format!("{}.", section.name),
            &fields,
            &section_defaults,
            &flags,
        )?;
    }
    for (key, flag) in &flags {
        if !out.contains(&format!("| `{key}` |")) {
            return Err(format!(
                "flag {flag} is a shorthand for `{key}`, which is no setting"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reference_page_is_up_to_date() {
        let page = render().unwrap_or_else(|e| panic!("cannot generate docs/CONFIG.md: {e}"));
        if std::env::var_os(REGENERATE_VAR).is_some() {
            std::fs::write(PAGE, &page).unwrap_or_else(|e| panic!("cannot write {PAGE}: {e}"));
            return;
        }
        let on_disk = std::fs::read_to_string(PAGE).unwrap_or_default();
        if on_disk != page {
            let line = on_disk
                .lines()
                .zip(page.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| on_disk.lines().count().min(page.lines().count()));
            panic!(
                "docs/CONFIG.md is out of date with broker/src/config.rs (first difference at \
                 line {}: expected {:?}). Regenerate it with:\n\n    {REGENERATE_COMMAND}\n",
                line + 1,
                page.lines().nth(line).unwrap_or("<end of page>")
            );
        }
    }

    #[test]
    fn config_reference_covers_every_field_and_shorthand() {
        let structs = parse_structs(CONFIG_SOURCE).expect("config.rs parses");
        let page = render().expect("page renders");
        let limits = structs.iter().find(|s| s.name == "Limits").expect("Limits");
        assert!(limits.fields.len() >= 18, "{}", limits.fields.len());
        for s in [
            "Listen", "Auth", "Storage", "Limits", "Timeouts", "Groups", "Rooms",
        ] {
            assert!(structs.iter().any(|x| x.name == s), "{s}");
        }
        assert!(page.contains("| `auth.secret` | (unset) |"), "{page}");
        assert!(
            page.contains(
                "| `listen.tcp` | `\"127.0.0.1:7400\"` | `PARLEY_LISTEN__TCP` | `--tcp` |"
            )
        );
        assert!(page.contains("| `data_dir` | `\"./data\"` | `PARLEY_DATA_DIR` | `--data-dir` |"));
        assert!(page.contains("| `admin.listen` |") && page.contains("| `--admin` |"));
        let flags = flag_shorthands(CLI_SOURCES);
        for flag in [
            "--tcp",
            "--ws",
            "--admin",
            "--shards",
            "--durability",
            "--data-dir",
        ] {
            assert!(flags.iter().any(|(_, f)| f == flag), "{flag} in {flags:?}");
        }
        let missing_doc = "pub struct X {\n    pub a: u32,\n}\n";
        let e = parse_structs(missing_doc)
            .err()
            .expect("a field without doc fails");
        assert!(e.contains("`X.a` has no doc comment"), "{e}");
    }
}
