//! A minimal SPICE link client for tests (placeholder).
