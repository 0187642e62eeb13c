//! Typed libvirt domain XML built from a Desktop (placeholder).
