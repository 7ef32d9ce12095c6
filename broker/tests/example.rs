//! The embedding example (`broker/examples/embedded_app.rs`) runs its scene in CI: an
//! application with its own login table embeds the broker and reacts to stored messages.

#[path = "../examples/embedded_app.rs"]
mod embedded_app;

#[test]
fn the_embedding_example_plays_its_scene() {
    if let Err(e) = embedded_app::run() {
        panic!("the example failed: {e}");
    }
}
