//! Helpers for the tests of the other crates (feature `testing`).

/// Whether `python3` compiles `program` (Python embedded in a binary:
/// the agent's boot programs, the keeper's helper).
pub fn python_compiles(program: &str) -> bool {
    use std::io::Write;
    let child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; compile(sys.stdin.read(), 'embedded.py', 'exec')",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn();
    child
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                i.write_all(program.as_bytes())?;
            }
            c.wait()
        })
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_is_told_from_nonsense() {
        assert!(super::python_compiles("x = 1\n"));
        assert!(!super::python_compiles("def (:\n"));
    }
}
