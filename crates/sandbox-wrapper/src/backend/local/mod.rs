//! The `local` backend: processes on this host, in a private work directory per session, under the strongest isolation the host offers.
