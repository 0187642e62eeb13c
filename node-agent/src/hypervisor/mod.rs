//! The one door to libvirt (placeholder).
