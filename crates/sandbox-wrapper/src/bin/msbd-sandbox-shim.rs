//! `msbd-sandbox-shim`: the program bubblewrap runs inside a sandbox to stack Landlock under it
//! before exec'ing the sandboxed program (see `sandbox_wrapper::backend::local::shim`). It is
//! not meant to be run by hand.

fn main() {
    sandbox_wrapper::backend::local::shim::run_if_requested();
    eprintln!(
        "msbd-sandbox-shim runs inside msbd's sandboxes only: it expects `{} --write <dir>... -- <program> [args]`",
        sandbox_wrapper::backend::local::shim::SHIM_FLAG
    );
    std::process::exit(2);
}
