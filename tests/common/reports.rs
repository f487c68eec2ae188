//! Child processes (the test binary re-run) tell their parent what they did, one line per
//! report on their stdout; the parent waits on those lines, or on a pipe's end when a
//! child exits, and checks what it waits for (in the store, in the lines) only then. No
//! notification crosses processes otherwise, and the parent never sleeps for a while to
//! look again.
//!
//! The parent reads the pipes itself, without waiting ([`Reports::drain`]), not on a
//! reader task: every line a child wrote before a drain began is in what that drain or an
//! earlier one returned (a child's write is done before it goes on, and the pipe holds
//! the line until read). A check that reads the store first and drains after so has every
//! line written before what it read from the store, as with a file read after it; a task
//! would leave lines in flight between the pipe and the check. For that the drain reads
//! the pipe itself until it is empty: tokio's `try_read` answers "would block" while its
//! reactor has not yet seen the pipe become readable, even with data in it (it is only
//! asked last, to clear that readiness, so `wait` does not wake for what was read).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::ChildStdout;
use std::task::Poll;

use tokio::net::unix::pipe;

/// Marks a report among what else a child prints on stdout (the test harness's lines;
/// its `test name ... ` may begin the line of the first report).
const MARK: &str = "@report ";

/// Child side: writes `report` as one line on stdout, whole before this returns (lines of
/// concurrent callers never interleave: stdout is locked for the line).
pub fn report(report: &str) -> std::io::Result<()> {
    let line = format!("{MARK}{report}\n");
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// One thing a child told the parent.
#[derive(Debug)]
pub enum Report {
    /// A report line, without its mark and newline.
    Line { child: String, text: String },
    /// Its stdout closed: it exited (a last line cut short by a kill is dropped).
    Exited { child: String },
}

struct Pipe {
    child: String,
    /// The pipe for waiting on.
    receiver: pipe::Receiver,
    /// The same pipe (a duplicate descriptor, non-blocking too) for reading.
    reader: std::fs::File,
    /// Read, not yet ended by a newline.
    partial: Vec<u8>,
}

/// Parent side: the stdout pipes of the children, read as they report.
#[derive(Default)]
pub struct Reports {
    pipes: Vec<Pipe>,
}

impl Reports {
    /// Reads the reports of `child` from its stdout (spawned with `Stdio::piped()`). On a
    /// tokio runtime.
    pub fn add(&mut self, child: impl Into<String>, stdout: ChildStdout) {
        let fd = OwnedFd::from(stdout);
        let reader = std::fs::File::from(fd.try_clone().expect("a duplicate of the pipe"));
        // Makes the pipe non-blocking, for `reader` too (one open file, two descriptors).
        let receiver = pipe::Receiver::from_owned_fd(fd).expect("a child's stdout pipe");
        self.pipes.push(Pipe {
            child: child.into(),
            receiver,
            reader,
            partial: Vec::new(),
        });
    }

    /// Waits until a child wrote something or exited since the last drain; `false` once
    /// `deadline` passed first.
    pub async fn wait(&self, deadline: tokio::time::Instant) -> bool {
        let ready = std::future::poll_fn(|cx| {
            // Each pipe not ready registers to wake this task when it becomes so.
            if self
                .pipes
                .iter()
                .any(|p| p.receiver.poll_read_ready(cx).is_ready())
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout_at(deadline, ready).await.is_ok()
    }

    /// Everything the pipes hold now, read without waiting: per child in the order it
    /// wrote; a child's exit after its last line.
    pub fn drain(&mut self) -> Vec<Report> {
        let mut reports = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        self.pipes.retain_mut(|pipe| {
            loop {
                let read = match pipe.reader.read(&mut buffer) {
                    // Empty: tokio's readiness is cleared (or what came since is read).
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        pipe.receiver.try_read(&mut buffer)
                    }
                    read => read,
                };
                match read {
                    Ok(0) => {
                        reports.push(Report::Exited {
                            child: pipe.child.clone(),
                        });
                        return false;
                    }
                    Ok(n) => {
                        pipe.partial.extend_from_slice(&buffer[..n]);
                        let Some(end) = pipe.partial.iter().rposition(|&b| b == b'\n') else {
                            continue;
                        };
                        let whole: Vec<u8> = pipe.partial.drain(..=end).collect();
                        let text = String::from_utf8(whole).expect("a child writes UTF-8");
                        for line in text.lines() {
                            if let Some((_, report)) = line.split_once(MARK) {
                                reports.push(Report::Line {
                                    child: pipe.child.clone(),
                                    text: report.to_owned(),
                                });
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("reading {}'s reports: {e}", pipe.child),
                }
            }
        });
        reports
    }
}
