//! Canopy's node-local image store.
//!
//! The node agent needs image root filesystems as plain directories it can stack as overlayfs
//! lower layers, and it needs them to survive crashes and concurrent use without ever exposing a
//! half-written image. This crate keeps everything under one root directory:
//!
//! ```text
//! <root>/
//!   lock                      flock(2) target: serialises mutations across processes
//!   index.json                names, ids, layer lists, parsed configs (the only "visible" state)
//!   blobs/sha256/<hex>        content-addressed blobs (manifests, configs, compressed layers)
//!   layers/<diffid-hex>/      unpacked layers (overlayfs form: whiteouts are 0:0 char devices)
//!   tmp/                      staging area, emptied at open
//! ```
//!
//! Crash safety comes from ordering, not from journaling: blobs are written to `tmp/`, verified
//! against their digest, fsync'd and renamed into `blobs/`; layers are unpacked into `tmp/` and
//! renamed into `layers/` only once their diff id has been verified; only then is `index.json`
//! replaced (write, fsync, rename). A crash at any point leaves at worst unreferenced blobs or
//! layers, which are swept by the next mutation, and never an image whose files are incomplete.
//!
//! Mutations take an in-process mutex and an exclusive `flock` on `<root>/lock`; readers just
//! read `index.json`, which is always replaced atomically.

mod archive;
mod error;
mod pull;
mod reference;
mod store;
pub mod testing;
mod unpack;

pub use error::ImageError;
pub use pull::{PullOptions, RegistryAuth};
pub use reference::normalize;
pub use store::{Image, ImageConfig, ImageStore};
