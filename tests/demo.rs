//! `mpool demo` as a user runs it: the binary starts the simulator and the pool daemon in one
//! process, walks a task through the public API and exits 0, printing its steps: hot, warm and
//! cold acquires, the file that is gone after the reset, and the one-shot Run.
use std::process::Command;

#[test]
fn demo_exits_zero_and_shows_its_steps() {
    let out = Command::new(env!("CARGO_BIN_EXE_mpool"))
        .arg("demo")
        .env_remove("MPOOL_ENDPOINT")
        .env("MPOOL_LOG", "warn")
        .output()
        .expect("mpool demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpool demo exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status.code());
    let row = |step: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(step))
            .unwrap_or_else(|| panic!("no {step:?} row:\n{stdout}"))
            .to_string()
    };
    assert!(row("acquire from pool hot").contains("(hot)"), "{stdout}");
    assert!(row("acquire from pool warm").contains("(warm)"), "{stdout}");
    assert!(row("acquire from pool cold").contains("(cold)"), "{stdout}");
    assert!(row("exec `uname -s`").contains("exit 0: Linux"), "{stdout}");
    assert!(row("exec `test -e note.txt`").contains("gone: the VM was reset"), "{stdout}");
    assert!(row("run (acquire+exec+download+release)").contains("exit 0, out.txt: one-shot"), "{stdout}");
    assert!(stdout.contains("\nDone in "), "{stdout}");
}
