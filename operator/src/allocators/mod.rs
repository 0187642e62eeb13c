//! Pure allocators for ports, MACs and subnets (placeholder).
