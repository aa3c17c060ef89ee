//! The pgds binary under test, run as a child process with its config in a temp file and its
//! output (stdout and stderr, `RUST_LOG=pgds=debug`) captured in a log file.
//!
//! Signals go through the `kill` command: libc is not a dependency.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{log_tail, signal};

/// How long `pgds check` may take before the test fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd pgds may take to exit.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary Cargo built for this test run.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_pgds")
}

/// A running `pgds run`.
pub struct Pgds {
    child: Option<Child>,
    status: Option<ExitStatus>,
    dir: TempDir,
}

impl Pgds {
    /// Write `config_toml` to a temp file and start `pgds run --config FILE`.
    pub fn spawn(config_toml: &str) -> Pgds {
        Self::spawn_with_env(config_toml, &[])
    }

    /// Like [`Pgds::spawn`], with extra environment variables (e.g. `PGDS__POSTGRES__URL`).
    pub fn spawn_with_env(config_toml: &str, env: &[(&str, &str)]) -> Pgds {
        let dir = tempfile::Builder::new()
            .prefix("pgds-run-")
            .tempdir()
            .expect("create a temp dir for pgds");
        let config = dir.path().join("pgds.toml");
        std::fs::write(&config, config_toml).expect("write the pgds config");
        let log = File::create(dir.path().join("pgds.log")).expect("create the pgds log");
        let err = log.try_clone().expect("clone the log file handle");
        let child = command(&["run"], &config, env)
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary()));
        Pgds {
            child: Some(child),
            status: None,
            dir,
        }
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let exited = match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten(),
            None => None,
        };
        if let Some(status) = exited {
            self.status = Some(status);
            self.child = None;
        }
        self.status
    }

    /// Panic with the log when pgds is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit() {
            panic!(
                "pgds exited unexpectedly ({status}); its log ends with:\n{}",
                self.log_tail(60)
            );
        }
    }

    /// A field of `/proc/PID/status` in KiB, e.g. `VmRSS` (resident memory now) or `VmHWM` (its
    /// peak), while the process runs.
    pub fn proc_status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.pid()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
    }

    /// SIGSTOP: freeze the process where it is (its connections stay open, it sends nothing).
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    /// SIGCONT after [`Pgds::freeze`].
    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }

    /// SIGKILL, as a crash would; waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }

    /// SIGTERM and wait for the exit (30 s at most, else panic with the log).
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
        }
        self.wait_exit(TERMINATE_TIMEOUT).await
    }

    /// Wait until the process exits; panic with the log after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pgds did not exit within {timeout:?}; its log ends with:\n{}",
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgds.log")
    }

    /// Everything pgds printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }
}

impl Drop for Pgds {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- pgds log, last lines ---\n{}", self.log_tail(80));
        }
    }
}

/// Run `pgds check --config FILE` with `config_toml`; return its exit status and its combined
/// stdout and stderr. Panics if it runs longer than a minute.
pub fn run_check(config_toml: &str) -> (ExitStatus, String) {
    run_check_with_env(config_toml, &[])
}

/// Like [`run_check`], with extra environment variables.
pub fn run_check_with_env(config_toml: &str, env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::Builder::new()
        .prefix("pgds-check-")
        .tempdir()
        .expect("create a temp dir for pgds check");
    let config = dir.path().join("pgds.toml");
    std::fs::write(&config, config_toml).expect("write the pgds config");
    let log_path = dir.path().join("output.log");
    let log = File::create(&log_path).expect("create the output file");
    let err = log.try_clone().expect("clone the output file handle");
    let mut child = command(&["check"], &config, env)
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary()));
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pgds check did not finish within {CHECK_TIMEOUT:?}; it printed:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    (status, output)
}

/// `pgds SUBCOMMAND --config FILE` with a clean, predictable environment: no inherited
/// `PGDS__*` overrides, debug logs for pgds, no colours.
fn command(subcommand: &[&str], config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(subcommand).arg("--config").arg(config);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PGDS__") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "pgds=debug")
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}
