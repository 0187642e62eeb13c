//! Pure two-level placement (placeholder).
