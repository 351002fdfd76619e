//! Child processes for tests: output captured line by line, SIGTERM to stop, killed when
//! dropped (also on panic), and their logs printed when a test fails.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::watch,
};

use crate::Error;

/// Most output lines kept per process: a long bench run logs millions, a test a few
/// hundred. Past it the oldest go.
const MAX_LINES: usize = 100_000;

/// The last [`MAX_LINES`] lines of a process's output, and how many came before them.
#[derive(Default)]
struct Output {
    lines: VecDeque<String>,
    dropped: usize,
}

/// A running child process whose stdout and stderr are collected.
pub struct ChildProcess {
    name: String,
    child: Child,
    lines: Arc<Mutex<Output>>,
    changed: watch::Receiver<usize>,
}

impl ChildProcess {
    /// Spawns `command` with piped output. The process is killed when this is dropped.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self, Error> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| Error::Process(format!("{name}: cannot spawn: {e}")))?;
        let lines = Arc::new(Mutex::new(Output::default()));
        let (tx, changed) = watch::channel(0);
        let tx = Arc::new(tx);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(collect(out, lines.clone(), tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(collect(err, lines.clone(), tx));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            changed,
        })
    }

    /// Everything the process wrote so far (the last 100,000 lines), one line per line.
    pub fn logs(&self) -> String {
        self.lines
            .lock()
            .map(|out| {
                let kept: Vec<&str> = out.lines.iter().map(String::as_str).collect();
                let kept = kept.join("\n");
                match out.dropped {
                    0 => kept,
                    n => format!("[{n} earlier lines not kept]\n{kept}"),
                }
            })
            .unwrap_or_default()
    }

    /// Waits until some output line satisfies `pick`, and returns what it picked.
    pub async fn wait_for_line<T>(
        &mut self,
        timeout: Duration,
        pick: impl Fn(&str) -> Option<T>,
    ) -> Result<T, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .lock()
                .ok()
                .and_then(|out| out.lines.iter().find_map(|l| pick(l)));
            if let Some(found) = found {
                return Ok(found);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Process(format!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.logs()
                )));
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                return Err(Error::Process(format!(
                    "{} not ready within {timeout:?}:\n{}",
                    self.name,
                    self.logs()
                )));
            }
        }
    }

    /// Fails when the process has exited or `deadline` has passed (for readiness loops).
    pub fn ensure_running(&mut self, deadline: tokio::time::Instant) -> Result<(), Error> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(Error::Process(format!(
                "{} exited ({status}):\n{}",
                self.name,
                self.logs()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Process(format!(
                "{} not ready in time:\n{}",
                self.name,
                self.logs()
            )));
        }
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the exit; kills it after that.
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, Error> {
        if let Some(pid) = self.child.id() {
            // `kill` keeps this crate free of unsafe libc calls.
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.map_err(|e| Error::Process(format!("{}: {e}", self.name))),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(Error::Process(format!(
                    "{} ignored SIGTERM for {grace:?}",
                    self.name
                )))
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let logs = self.logs();
        if std::thread::panicking() {
            eprintln!(
                "----- {} output -----\n{logs}\n----- end of {} -----",
                self.name, self.name
            );
        } else if crate::leak_audit::holds_a_piece(&logs) {
            // Every process's output is audited when the test lets go of it: a failed
            // drop fails the test, which is the point.
            #[allow(clippy::panic)]
            {
                panic!(
                    "{}",
                    crate::leak_audit::finding(&format!("the output of {}", self.name))
                );
            }
        }
    }
}

async fn collect(
    stream: impl AsyncRead + Unpin,
    lines: Arc<Mutex<Output>>,
    tx: Arc<watch::Sender<usize>>,
) {
    let mut reader = BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if let Ok(mut out) = lines.lock() {
            out.lines.push_back(line);
            if out.lines.len() > MAX_LINES {
                out.lines.pop_front();
                out.dropped += 1;
            }
            tx.send_replace(out.dropped + out.lines.len());
        }
    }
}

/// The workspace root (where `Cargo.toml` with `[workspace]` is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Path of the `tokensmith` binary, built first (once per test process) so tests never
/// run a stale one. It sits next to the running test binary's profile directory.
pub fn tokensmith_bin() -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let profile = profile_dir()?;
            let mut args = vec!["build", "--quiet", "--workspace", "--bins"];
            // The same profile as the running program: a release load tool drives a
            // release companion.
            if profile.ends_with("release") {
                args.push("--release");
            }
            let status = std::process::Command::new(cargo)
                // The same selection as `make build`, so features unify the same way and
                // nothing is compiled twice.
                .args(&args)
                .current_dir(workspace_root())
                .status()
                .map_err(|e| format!("cannot run cargo build: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build --workspace --bins failed: {status}"));
            }
            let bin = profile.join("tokensmith");
            if bin.is_file() {
                Ok(bin)
            } else {
                Err(format!("{} missing after cargo build", bin.display()))
            }
        })
        .clone()
        .map_err(Error::Process)
}

/// Path of `tokensmith_filter.wasm` (wasm32-wasip1, size profile), built first once per
/// test process. Needs `rustup target add wasm32-wasip1` (`make test` does it).
pub fn filter_wasm() -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_wasm("tokensmith-filter"))
        .clone()
        .map_err(Error::Process)
}

/// Path of `tokensmith_noop_filter.wasm`, the bench's in-proxy floor, built like
/// [`filter_wasm`].
pub fn noop_filter_wasm() -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_wasm("tokensmith-noop-filter"))
        .clone()
        .map_err(Error::Process)
}

fn build_wasm(package: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ])
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {package} failed ({status}); is the target installed? `rustup target add wasm32-wasip1`"
        ));
    }
    // target/<profile>/deps/e2e-… → target/wasm32-wasip1/wasm/
    let target = profile_dir()?.parent().ok_or("target dir")?.to_path_buf();
    let wasm = target.join(format!(
        "wasm32-wasip1/wasm/{}.wasm",
        package.replace('-', "_")
    ));
    if wasm.is_file() {
        Ok(wasm)
    } else {
        Err(format!("{} missing after cargo build", wasm.display()))
    }
}

/// `target/<profile>` of the running executable (tests live in `target/<profile>/deps`,
/// binaries in `target/<profile>`).
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe.parent().ok_or("executable has no directory")?;
    Ok(if dir.ends_with("deps") {
        dir.parent().ok_or("deps has no parent")?.to_path_buf()
    } else {
        dir.to_path_buf()
    })
}
