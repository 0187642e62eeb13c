//! FNV-1a, the 64-bit hash that turns a desktop UID into a MAC candidate and a MAC into an IP
//! candidate: the one in [`crate::names`], which must never change between releases.

pub use crate::names::fnv1a64;
