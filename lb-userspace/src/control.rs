//! The daemon's control socket (`/run/mlb/<name>.sock`): one JSON request per connection,
//! one JSON reply. Used by `mlb status` and `mlb drain`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::state::Snapshot;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Status,
    Drain {
        address: IpAddr,
        drained: bool,
    },
    /// Withdraw every Vip (forwarding goes on), or announce again.
    Maintenance {
        on: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok(String),
    Error(String),
    Status(Box<Snapshot>),
}

/// Removes the socket file when dropped.
pub struct Server {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the socket at `path`, passing each command to the daemon loop.
pub fn serve(
    path: &Path,
    commands: mpsc::Sender<(Command, oneshot::Sender<Reply>)>,
) -> std::io::Result<Server> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let commands = commands.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Command>(&line) {
                    Ok(command) => {
                        let (tx, rx) = oneshot::channel();
                        if commands.send((command, tx)).await.is_err() {
                            Reply::Error("daemon is stopping".into())
                        } else {
                            rx.await.unwrap_or_else(|_| Reply::Error("no reply".into()))
                        }
                    }
                    Err(e) => Reply::Error(format!("bad request: {e}")),
                };
                let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
                bytes.push(b'\n');
                if let Err(e) = write.write_all(&bytes).await {
                    warn!(error = %e, "control reply");
                }
            });
        }
    });
    Ok(Server {
        path: path.to_owned(),
        task,
    })
}

/// Sends one command to the daemon listening on `path` (blocking client for the CLI).
pub fn request(path: &Path, command: &Command) -> std::io::Result<Reply> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut bytes = serde_json::to_vec(command).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
