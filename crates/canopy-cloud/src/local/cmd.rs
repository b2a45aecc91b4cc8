//! Running `ip`, `nft` and friends. Every failure names the command line and carries its
//! stderr: a kernel refusal is only debuggable with the kernel's words.

use std::{ffi::OsStr, process::Stdio};

use anyhow::{Context, Result, bail};
use tokio::{io::AsyncWriteExt, process::Command};

/// How long one `ip`, `nft` or `cp` may take (copying an image seed falls back to a full
/// copy across file systems, the slowest of them).
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A command line, kept for error messages. Arguments are never secret: secrets travel in
/// files only.
pub struct Cmd {
    program: String,
    args: Vec<String>,
    stdin: Option<String>,
    timeout: std::time::Duration,
}

impl Cmd {
    pub fn new(program: &str) -> Cmd {
        Cmd {
            program: program.to_string(),
            args: Vec::new(),
            stdin: None,
            timeout: COMMAND_TIMEOUT,
        }
    }

    #[cfg(test)]
    fn timeout(mut self, timeout: std::time::Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// `ip [-n <netns>] …`
    pub fn ip(netns: Option<&str>) -> Cmd {
        let cmd = Cmd::new("ip");
        match netns {
            Some(ns) => cmd.args(["-n", ns]),
            None => cmd,
        }
    }

    /// `nft -f -` (with the script on stdin), in a namespace if given: one script is one
    /// nftables transaction, applied entirely or not at all.
    pub fn nft(netns: Option<&str>, script: String) -> Cmd {
        let cmd = match netns {
            Some(ns) => Cmd::new("ip").args(["netns", "exec", ns, "nft", "-f", "-"]),
            None => Cmd::new("nft").args(["-f", "-"]),
        };
        cmd.stdin(script)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    pub fn stdin(mut self, input: String) -> Cmd {
        self.stdin = Some(input);
        self
    }

    fn line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    async fn output(&self) -> Result<std::process::Output> {
        tracing::trace!(command = %self.line(), "running");
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{}`", self.line()))?;
        let stdin = child.stdin.take();
        let input = self.stdin.as_deref().unwrap_or_default().as_bytes();
        // Feeding the input while collecting the output: a command that answers before it
        // has read everything (`ip -batch`) must not block on a full pipe while we do.
        let feed = async move {
            if let Some(mut stdin) = stdin {
                stdin.write_all(input).await?;
            }
            // Dropping stdin here is the end of the input.
            Ok::<(), std::io::Error>(())
        };
        // A command that hangs (a kernel lock held elsewhere, a wedged namespace) fails the
        // call instead of the cloud: the child is killed when the future is dropped, and
        // the controller retries on its next pass.
        let (fed, output) = match tokio::time::timeout(self.timeout, async {
            tokio::join!(feed, child.wait_with_output())
        })
        .await
        {
            Ok(done) => done,
            Err(_) => bail!("`{}` did not finish within {:?}", self.line(), self.timeout),
        };
        let output = output.with_context(|| format!("waiting for `{}`", self.line()))?;
        if let Err(e) = fed
            && output.status.success()
        {
            return Err(e).with_context(|| format!("writing the input of `{}`", self.line()));
        }
        Ok(output)
    }

    /// Runs it; its stdout, or an error with the command line, status and stderr.
    pub async fn run(self) -> Result<String> {
        let output = self.output().await?;
        if !output.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                self.line(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs it, taking a failure whose stderr says the object is already gone as success:
    /// deletions are idempotent.
    pub async fn run_absent_ok(self) -> Result<()> {
        self.probe().await.map(drop)
    }

    /// Runs it: `true` if it succeeded, `false` if it failed because the object it names
    /// does not exist, an error for any other failure.
    pub async fn probe(self) -> Result<bool> {
        let output = self.output().await?;
        if output.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let gone = [
            "Cannot find device",
            "No such file or directory",
            "does not exist",
            "No such process",
        ];
        if gone.iter().any(|g| stderr.contains(g)) {
            return Ok(false);
        }
        bail!(
            "`{}` failed ({}): {}",
            self.line(),
            output.status,
            stderr.trim()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_that_hangs_fails_and_is_killed() {
        let started = std::time::Instant::now();
        let err = Cmd::new("sleep")
            .arg("30")
            .timeout(std::time::Duration::from_millis(200))
            .run()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sleep 30` did not finish"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[tokio::test]
    async fn failures_name_the_command_and_its_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo kernel says no >&2; exit 3"])
            .run()
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`sh -c echo kernel says no >&2; exit 3`"),
            "{err}"
        );
        assert!(err.contains("kernel says no"), "{err}");
        assert!(err.contains('3'), "{err}");
        let out = Cmd::new("cat").stdin("in".into()).run().await.unwrap();
        assert_eq!(out, "in");
        Cmd::new("sh")
            .args(["-c", "echo 'Cannot find device \"x\"' >&2; exit 1"])
            .run_absent_ok()
            .await
            .unwrap();
        assert!(
            Cmd::new("sh")
                .args(["-c", "echo other >&2; exit 1"])
                .run_absent_ok()
                .await
                .is_err()
        );
    }
}
