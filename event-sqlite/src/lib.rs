//! SQLite store (placeholder)
