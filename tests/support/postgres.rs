//! A throw-away PostgreSQL cluster per test: `initdb` into a temp dir, `postgres` on a free
//! loopback port with `wal_level=logical`, killed (immediate shutdown) and removed on drop.
//!
//! PostgreSQL refuses to run as root, so under root the temp dir is handed to the `postgres`
//! user and the server binaries run with its uid and gid (set by `Command::uid`/`gid`, so the
//! child we hold *is* the postmaster and can be signalled directly).

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, log_tail, signal, wait_child};

/// How long a cluster may take to accept connections (many start at once on a 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts when the chosen port was taken between picking and binding it.
const PORT_ATTEMPTS: usize = 5;

/// Settings every test cluster starts with; `start_with` overrides or extends them.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("wal_sender_timeout", "10s"),
    ("fsync", "off"),
    ("shared_buffers", "32MB"),
    ("max_connections", "50"),
];

/// How the postmaster is asked to stop, as `pg_ctl stop -m MODE` does it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGTERM: wait for every session to end (walsenders included).
    Smart,
    /// SIGINT: roll back open transactions, disconnect every session, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once without a checkpoint; the next start runs crash recovery.
    Immediate,
}

/// A running PostgreSQL cluster owned by one test.
pub struct PgCluster {
    port: u16,
    /// The postmaster; `None` once stopped.
    child: Option<Child>,
    /// Holds `data/` and `postgres.log`; removed on drop.
    dir: Option<TempDir>,
    /// The `-c` settings the postmaster runs with (kept for a restart).
    settings: Vec<(String, String)>,
}

impl PgCluster {
    /// Start a cluster with the default settings (`wal_level=logical`).
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// Start a cluster with some settings changed or added, e.g. `[("wal_level", "replica")]`.
    pub fn start_with(overrides: &[(&str, &str)]) -> PgCluster {
        Self::start_with_initdb(&[], overrides)
    }

    /// Like [`PgCluster::start_with`], with extra `initdb` arguments, e.g. `["--wal-segsize=1"]`.
    pub fn start_with_initdb(initdb_args: &[&str], overrides: &[(&str, &str)]) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgds-pg-")
            .tempdir()
            .expect("create a temp dir for the cluster");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the cluster dir to the postgres user");
        }
        let log = dir.path().join("postgres.log");
        initdb(dir.path(), &log, initdb_args);

        let mut settings: Vec<(String, String)> = DEFAULT_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in overrides {
            match settings.iter_mut().find(|(key, _)| key == k) {
                Some(entry) => entry.1 = v.to_string(),
                None => settings.push((k.to_string(), v.to_string())),
            }
        }

        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let mut child = spawn_postmaster(dir.path(), &log, &settings, port);
            if wait_ready(&mut child, port, &log) {
                return PgCluster {
                    port,
                    child: Some(child),
                    dir: Some(dir),
                    settings,
                };
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            if attempt == PORT_ATTEMPTS || !text.contains("could not bind") {
                panic!(
                    "postgres exited during start-up on port {port}; its log ends with:\n{}",
                    log_tail(&log, 40)
                );
            }
            // Another process took the port between picking and binding it: try another.
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB?sslmode=disable` (trust authentication).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Create database `name` and return its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Run SQL through `psql` (synchronous: usable outside a runtime); panics on any error.
    /// Returns what psql printed (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(bin("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(self.url(db))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        assert!(
            out.status.success(),
            "psql failed on {db}: {sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `tokio-postgres` client on `db`; its connection runs on a spawned task.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to database {db} on port {}: {e}", self.port));
        tokio::spawn(async move {
            // Ends with an error when the cluster is stopped under it: nothing to report.
            let _ = connection.await;
        });
        client
    }

    /// Path of a PostgreSQL server binary (`pg_recvlogical`, `psql`, …).
    pub fn bin(&self, name: &str) -> PathBuf {
        bin(name)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("postgres.log"))
            .unwrap_or_default()
    }

    /// The cluster's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the postmaster with `mode` and wait until it exited (30 s, then SIGKILL); the data
    /// dir stays for [`PgCluster::start_again`].
    pub fn shutdown(&mut self, mode: ShutdownMode) {
        self.shutdown_within(mode, Duration::from_secs(30));
    }

    /// [`PgCluster::shutdown`] with another deadline. (A fast shutdown waits until every
    /// logical walsender's client confirmed all the WAL it was sent: a slow client delays it.)
    pub fn shutdown_within(&mut self, mode: ShutdownMode, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let name = match mode {
            ShutdownMode::Smart => "TERM",
            ShutdownMode::Fast => "INT",
            ShutdownMode::Immediate => "QUIT",
        };
        signal(child.id(), name);
        if wait_child(&mut child, timeout).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "postgres on port {} did not stop within {timeout:?} of SIG{name}; its log ends with:\n{}",
                self.port,
                log_tail(&self.log_path(), 30)
            );
        }
    }

    /// Start the postmaster again on the same port, data dir and settings, after
    /// [`PgCluster::shutdown`]; waits until it accepts connections (crash recovery included).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the cluster is running");
        let dir = self
            .dir
            .as_ref()
            .expect("the cluster was not removed")
            .path();
        let log = dir.join("postgres.log");
        // The port was ours a moment ago; another process may grab it meanwhile: retry briefly.
        for _ in 0..50 {
            let mut child = spawn_postmaster(dir, &log, &self.settings, self.port);
            if wait_ready(&mut child, self.port, &log) {
                self.child = Some(child);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "postgres did not start again on port {}; its log ends with:\n{}",
            self.port,
            log_tail(&log, 40)
        );
    }

    /// Stop with `mode` and start again on the same port and data dir, as `pg_ctl restart -m
    /// MODE` does.
    pub fn restart(&mut self, mode: ShutdownMode) {
        self.shutdown(mode);
        self.start_again();
    }

    /// Immediate shutdown (SIGQUIT, then SIGKILL after 10 s) and removal of the temp dir.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "QUIT");
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                eprintln!(
                    "--- postgres log (port {}), last lines ---\n{}",
                    self.port,
                    log_tail(&dir.path().join("postgres.log"), 20)
                );
            }
            drop(dir);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawn the postmaster of the cluster in `dir`, output appended to `log`.
fn spawn_postmaster(dir: &Path, log: &Path, settings: &[(String, String)], port: u16) -> Child {
    let mut cmd = server_command("postgres");
    cmd.arg("-D").arg(dir.join("data"));
    cmd.arg("-c").arg(format!("port={port}"));
    cmd.arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()));
    for (k, v) in settings {
        cmd.arg("-c").arg(format!("{k}={v}"));
    }
    let out = append(log);
    let err = out.try_clone().expect("clone the log file handle");
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn postgres: {e}"))
}

/// Poll until the server accepts connections: `true`, or `false` when it exited first.
fn wait_ready(child: &mut Child, port: u16, log: &Path) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let ready = Command::new(bin("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-t", "2", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            return true;
        }
        if Instant::now() >= deadline {
            signal(child.id(), "QUIT");
            if wait_child(child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!(
                "postgres on port {port} did not accept connections within {START_TIMEOUT:?}; its log ends with:\n{}",
                log_tail(log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn append(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn initdb(dir: &Path, log: &Path, extra: &[&str]) {
    let out = server_command("initdb")
        .args([
            "-A",
            "trust",
            "-N",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .args(extra)
        .arg("-D")
        .arg(dir.join("data"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run initdb: {e}"));
    let _ = fs::write(log, [&out.stdout[..], &out.stderr[..]].concat());
    assert!(
        out.status.success(),
        "initdb failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command for a server binary, as the `postgres` user when we are root.
fn server_command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp").env("USER", "postgres");
    }
    cmd
}

/// The directory of the PostgreSQL server binaries: `PGDS_PG_BINDIR`, else `pg_config --bindir`,
/// else `/usr/lib/postgresql/15/bin`.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGDS_PG_BINDIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        for dir in from_pg_config
            .into_iter()
            .chain([PathBuf::from("/usr/lib/postgresql/15/bin")])
        {
            if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
                return dir;
            }
        }
        panic!(
            "PostgreSQL server binaries (postgres, initdb) not found via PGDS_PG_BINDIR, \
             `pg_config --bindir` or /usr/lib/postgresql/15/bin: install them \
             (apt-get install -y postgresql-15) and run the tests with scripts/test"
        )
    })
}

fn bin(name: &str) -> PathBuf {
    bindir().join(name)
}

/// `Some((uid, gid))` of the `postgres` user when running as root, `None` otherwise.
fn run_as() -> Option<(u32, u32)> {
    static RUN_AS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        if id(&["-u"]) != 0 {
            return None;
        }
        Some((id(&["-u", "postgres"]), id(&["-g", "postgres"])))
    })
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run id: {e}"));
    assert!(
        out.status.success(),
        "`id {}` failed: PostgreSQL refuses to run as root and the tests need a `postgres` \
         user to run it as (the postgresql-15 package creates it): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("id prints a number")
}
