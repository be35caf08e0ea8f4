//! The real binaries (`nth-lambda`, `nth-agent`) as child processes, their JSON log lines
//! captured for assertions.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A binary built from this workspace, next to the running test or tool
/// (`target/<profile>/NAME`). `scripts/test` builds them before the tests run.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("test executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build -p nth-lambda` (scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running workspace binary. It can be restarted in place, as Lambda replaces an
/// execution environment whose invocation timed out; its output is kept across restarts.
#[derive(Debug)]
pub struct Process {
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: BTreeMap<String, String>,
    child: Mutex<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Process {
    /// Starts the workspace binary `name` with `args` and exactly `env` (nothing inherited, so
    /// the host's AWS settings cannot leak in).
    pub fn spawn(
        name: &str,
        args: &[&std::ffi::OsStr],
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let binary = workspace_binary(name)?;
        let args: Vec<_> = args.iter().map(|a| a.to_os_string()).collect();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let child = start(&binary, &args, env, &lines)?;
        Ok(Self {
            binary,
            args,
            env: env.clone(),
            child: Mutex::new(child),
            lines,
        })
    }

    /// Kills the process and starts it again with the same arguments and environment.
    pub fn restart(&self) -> anyhow::Result<()> {
        let mut child = lock(&self.child);
        let _already_gone = child.start_kill();
        *child = start(&self.binary, &self.args, &self.env, &self.lines)?;
        Ok(())
    }

    /// Every line the process wrote so far.
    pub fn output(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Waits (a little) until a line satisfying `wanted` has been read: the process writes a
    /// line before it answers the Runtime API, but the pipe is read concurrently.
    pub async fn wait_for_line(&self, wanted: impl Fn(&str) -> bool) -> bool {
        for _ in 0..50 {
            if self.output().iter().any(|l| wanted(l)) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }

    /// Everything written so far, as one text.
    pub fn output_text(&self) -> String {
        self.output().join("\n")
    }

    /// The lines that are JSON log records.
    pub fn log_records(&self) -> Vec<Value> {
        self.output()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).id()
    }

    pub fn is_running(&self) -> bool {
        matches!(lock(&self.child).try_wait(), Ok(None))
    }

    pub async fn stop(self) {
        let mut child = self
            .child
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _already_gone = child.kill().await;
    }
}

/// Spawns `binary`, its standard output and error read line by line into `lines`.
fn start(
    binary: &std::path::Path,
    args: &[std::ffi::OsString],
    env: &BTreeMap<String, String>,
    lines: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<Child> {
    let mut child = Command::new(binary)
        .args(args)
        .env_clear()
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = Arc::clone(lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lock(&lines).push(line);
            }
        });
    }
    Ok(child)
}
