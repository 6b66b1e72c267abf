//! The supervisor of every background loop.
