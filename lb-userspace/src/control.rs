//! The daemon's control socket (`/run/mlb/<name>.sock`): one JSON request per connection,
//! one JSON reply. Used by `mlb status` and `mlb drain`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
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

/// Adjacently tagged: an internally tagged enum cannot carry a bare string, and every
/// `Ok`/`Error` reply used to serialize to nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", content = "body", rename_all = "snake_case")]
pub enum Reply {
    Ok(String),
    Error(String),
    Status(Box<Snapshot>),
}

/// What a client may cost the daemon. Anyone who can connect is trusted to command it, but
/// not to hold its memory or its tasks.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest request line, newline included.
    pub max_request: usize,
    /// Time to send the request line, and to take the reply.
    pub timeout: Duration,
    /// Connections served at once; more are answered "busy" and closed.
    pub max_connections: usize,
    /// `global.control_group`: members of this group may use the socket too (mode 0660).
    pub group: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 64 * 1024,
            timeout: Duration::from_secs(5),
            max_connections: 32,
            group: None,
        }
    }
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

type Commands = mpsc::Sender<(Command, oneshot::Sender<Reply>)>;

/// Serves the socket at `path`, passing each command to the daemon loop; members of
/// `group` may use it as well as root and the daemon's user.
pub fn serve(path: &Path, commands: Commands, group: Option<u32>) -> std::io::Result<Server> {
    serve_with(
        path,
        commands,
        Limits {
            group,
            ..Limits::default()
        },
    )
}

/// [`serve`] with explicit limits. The socket is made mode 0600 (owner: the daemon's
/// user), or 0660 with `limits.group` as its group, and every peer's credentials are
/// checked: root, the daemon's own user, or a member of that group.
pub fn serve_with(path: &Path, commands: Commands, limits: Limits) -> std::io::Result<Server> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Before the first accept; the peer check below covers a client that connected in
    // between.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = limits.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    stream
                }
                Err(e) => {
                    // EMFILE and the like: retrying at once would spin.
                    warn!(error = %e, retry_in = ?backoff, "control socket accept");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let commands = commands.clone();
            let slots = slots.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                // Peers are checked first: a refused one never takes a slot.
                let reply = match authorize(&stream, limits.group) {
                    Err(reply) => reply,
                    Ok(()) => match slots.try_acquire_owned() {
                        Ok(_slot) => Some(handle(&mut stream, commands, limits).await),
                        Err(_) => Some(Reply::Error("busy: too many control connections".into())),
                    },
                };
                if let Some(reply) = reply {
                    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
                    bytes.push(b'\n');
                    match tokio::time::timeout(limits.timeout, stream.write_all(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "control reply"),
                        Err(_) => warn!("control reply: client did not read it in time"),
                    }
                }
            });
        }
    });
    Ok(Server {
        path: path.to_owned(),
        task,
    })
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Root, the daemon's own user and members of `group` may command it; anyone else is
/// answered and closed.
fn authorize(stream: &UnixStream, group: Option<u32>) -> Result<(), Option<Reply>> {
    // SAFETY: plain syscall, no pointers.
    let me = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == me => Ok(()),
        Ok(cred) if group.is_some_and(|g| in_group(cred.uid(), cred.gid(), g)) => Ok(()),
        Ok(cred) => {
            warn!(uid = cred.uid(), pid = ?cred.pid(), "control socket: peer refused");
            Err(Some(Reply::Error(format!(
                "permission denied: uid {} may not use this socket",
                cred.uid()
            ))))
        }
        Err(e) => {
            warn!(error = %e, "control socket: no peer credentials");
            Err(None)
        }
    }
}

/// Whether the user `uid` (primary group `gid`) is a member of group `group`.
fn in_group(uid: u32, gid: u32, group: u32) -> bool {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    if gid == group {
        return true;
    }
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, Gid::from_raw(gid))
        .is_ok_and(|groups| groups.contains(&Gid::from_raw(group)))
}

/// One request: one bounded line read in bounded time, and the command run.
async fn handle(stream: &mut UnixStream, commands: Commands, limits: Limits) -> Reply {
    let line =
        match tokio::time::timeout(limits.timeout, read_line(stream, limits.max_request)).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Reply::Error(format!("bad request: {e}")),
            Err(_) => {
                return Reply::Error(format!(
                    "bad request: no complete line within {:?}",
                    limits.timeout
                ));
            }
        };
    match serde_json::from_slice::<Command>(&line) {
        Ok(command) => {
            let (tx, rx) = oneshot::channel();
            if commands.send((command, tx)).await.is_err() {
                Reply::Error("daemon is stopping".into())
            } else {
                rx.await.unwrap_or_else(|_| Reply::Error("no reply".into()))
            }
        }
        Err(e) => Reply::Error(format!("bad request: {e}")),
    }
}

/// Reads up to a newline, refusing a line longer than `max` (newline included) without
/// holding more than `max` bytes.
async fn read_line(stream: &mut UnixStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(256);
    let mut reader = BufReader::new(stream).take(max as u64);
    reader.read_until(b'\n', &mut line).await?;
    if line.last() != Some(&b'\n') {
        let why = if line.len() >= max {
            format!("longer than {max} bytes")
        } else {
            "connection closed before the end of the line".to_owned()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    Ok(line)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_survives_the_wire() {
        for reply in [
            Reply::Ok("drained".into()),
            Reply::Error("bad request".into()),
            Reply::Status(Box::default()),
        ] {
            let bytes = serde_json::to_vec(&reply).expect("serializes");
            let back: Reply = serde_json::from_slice(&bytes).expect("parses back");
            assert_eq!(format!("{back:?}"), format!("{reply:?}"));
        }
    }
}
