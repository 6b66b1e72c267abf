//! Operator-defined task types, loaded from a TOML file.
