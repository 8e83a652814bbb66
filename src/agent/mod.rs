//! Built-in reference agents (being written).
