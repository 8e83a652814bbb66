//! HAIP 1.1.2 client codec (being written).
