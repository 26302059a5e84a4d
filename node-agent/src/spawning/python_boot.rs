//! The Python programs the agent hands to the job's Python: in the
//! environment, popped by the first statement, so that neither `ps` (a short
//! command line) nor the user's tasks (a clean environment) see them.
//!
//! Each program starts with the standard-library-only workaround that keeps
//! a dead TLS peer from closing a dask process's healthy connections
//! (CPython issue 148594; see python/dask_spank/tls_eof.py). The same file
//! is a module of the dask_spank package, for the notebook's Client; here it
//! is for the job's own Python, which may not have dask_spank.

/// The workaround and the boot code (python/dask_spank/boot.py: the
/// command names, the restart-in-place mark), followed by the given
/// literals (one place for the files' paths; `concat!` takes only
/// literals, not a `const`).
macro_rules! after_tls_eof {
    ($($tail:expr),+) => {
        concat!(
            include_str!("../../../python/dask_spank/tls_eof.py"),
            include_str!("../../../python/dask_spank/boot.py"),
            $($tail),+
        )
    };
}

/// A program handed over in the variable `var`.
#[derive(Debug, Clone, Copy)]
pub struct EnvProgram {
    pub var: &'static str,
    pub program: &'static str,
}

impl EnvProgram {
    /// `-c` and the statement that pops the program and runs it; what
    /// follows on the command line is its `sys.argv[1:]`.
    pub fn args(&self) -> [String; 2] {
        [
            "-c".into(),
            format!("import os;exec(os.environ.pop('{}'))", self.var),
        ]
    }

    /// The variable to add to the process's environment.
    pub fn env(&self) -> (&'static str, &'static str) {
        (self.var, self.program)
    }
}

/// An exec'd dask command: the workaround, then the command named by the
/// next argument (`dask-scheduler`, `dask-worker`: short, for `ps`; see
/// `COMMANDS` in boot.py), run exactly as `python -m` runs its module.
pub const DASK: EnvProgram = EnvProgram {
    var: "DASK_SPANK_BOOT",
    program: after_tls_eof!("\nrun_module()\n"),
};

/// The fork server, which applies the workaround before its workers make
/// their TLS contexts.
pub const FORKSERVER: EnvProgram = EnvProgram {
    var: "DASK_SPANK_FORKSERVER",
    program: after_tls_eof!(include_str!("forkserver.py")),
};

#[cfg(test)]
mod tests {
    use super::*;

    const TLS_EOF: &str = include_str!("../../../python/dask_spank/tls_eof.py");

    /// Each program compiles, starts with the workaround, and its boot
    /// statement pops its own variable.
    #[test]
    fn programs_compile_and_start_with_the_workaround() {
        for p in [DASK, FORKSERVER] {
            assert!(p.program.starts_with(TLS_EOF), "{}", p.var);
            assert!(p.args()[1].contains(&format!("pop('{}')", p.var)));
            assert!(
                dask_spank_common::testing::python_compiles(p.program),
                "{}",
                p.var
            );
        }
        assert!(DASK.program.trim_end().ends_with("run_module()"));
    }
}
