//! The parley load generator, with correctness checking built in.
//!
//! This crate is filled by the loadgen issue. Like every outside client it reaches the broker
//! only through `parley-proto` and sockets.
