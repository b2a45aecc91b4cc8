//! Attaching to a container's main process (`kubectl attach`, `kubectl run -it`).
//!
//! The shim owns the container's standard streams: its output pipes (or the master side of
//! its terminal) and, when the container asked for stdin, the write end of its input. It
//! serves `<bundle>/attach.sock`: every client gets the output as it is produced (besides
//! the log file) and may send input and terminal resizes. Frames in both directions are
//! `[kind: u8][length: u32 BE][payload]`.
//!
//! Socket paths can exceed the 108 bytes of `sun_path` (bundles live under the agent's
//! state directory and are named after pod uids): both ends reach the socket through
//! `/proc/self/fd/<bundle directory>/attach.sock`.

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

/// Client → shim: bytes for the container's stdin.
pub const STDIN: u8 = 0;
/// Client → shim: the client's input ended.
pub const CLOSE_STDIN: u8 = 1;
/// Client → shim: terminal size, width and height as two u16 BE.
pub const RESIZE: u8 = 2;
/// Shim → client: container output.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

/// Largest frame accepted (a client is the agent, but bounds cost nothing).
const MAX_FRAME: usize = 1 << 20;

/// The socket's name inside the bundle.
pub const SOCKET: &str = "attach.sock";

/// A path naming `name` in `dir` that fits `sun_path`, valid while `dir_handle` is open.
pub fn short_path(dir_handle: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir_handle.as_raw_fd()))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("attach frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// The shim's side: the container's streams and the attached clients.
pub(crate) struct Streams {
    clients: Mutex<Vec<UnixStream>>,
    /// Where input goes (a pipe, or the terminal's master); `None` once closed.
    stdin: Mutex<Option<File>>,
    /// The terminal's master side, for resizes.
    terminal: Option<File>,
    /// Upstream's `stdinOnce`: the first client to leave closes the container's input.
    stdin_once: bool,
}

impl Streams {
    pub(crate) fn new(stdin: Option<File>, terminal: Option<File>, stdin_once: bool) -> Arc<Self> {
        Arc::new(Streams {
            clients: Mutex::new(Vec::new()),
            stdin: Mutex::new(stdin),
            terminal,
            stdin_once,
        })
    }

    /// Sends output to every client; a client that cannot take it within a second is
    /// dropped rather than slowing the container down.
    pub(crate) fn broadcast(&self, kind: u8, data: &[u8]) {
        let mut clients = self.clients.lock();
        clients.retain_mut(|client| {
            let kept = write_frame(client, kind, data).is_ok();
            if !kept {
                let _ = client.shutdown(std::net::Shutdown::Both);
            }
            kept
        });
    }

    /// Ends every attachment (the container exited).
    pub(crate) fn close_all(&self) {
        for client in self.clients.lock().drain(..) {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Serves `<bundle>/attach.sock` on a thread of its own.
    pub(crate) fn serve(self: &Arc<Self>, bundle: &Path) -> std::io::Result<()> {
        let dir = File::open(bundle)?;
        let path = short_path(&dir, SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let streams = self.clone();
        std::thread::spawn(move || {
            let _dir = dir;
            for connection in listener.incoming().flatten() {
                let streams = streams.clone();
                std::thread::spawn(move || streams.client(connection));
            }
        });
        Ok(())
    }

    fn client(self: Arc<Self>, mut connection: UnixStream) {
        let Ok(output) = connection.try_clone() else {
            return;
        };
        let _ = output.set_write_timeout(Some(Duration::from_secs(1)));
        self.clients.lock().push(output);
        let mut wrote_input = false;
        while let Ok(Some((kind, payload))) = read_frame(&mut connection) {
            match kind {
                STDIN => {
                    wrote_input = true;
                    let mut stdin = self.stdin.lock();
                    if let Some(input) = stdin.as_mut()
                        && input.write_all(&payload).is_err()
                    {
                        *stdin = None;
                    }
                }
                CLOSE_STDIN if self.stdin_once => *self.stdin.lock() = None,
                RESIZE if payload.len() == 4 => {
                    if let Some(terminal) = &self.terminal {
                        let size = rustix::termios::Winsize {
                            ws_col: u16::from_be_bytes([payload[0], payload[1]]),
                            ws_row: u16::from_be_bytes([payload[2], payload[3]]),
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        let _ = rustix::termios::tcsetwinsize(terminal, size);
                    }
                }
                _ => {}
            }
        }
        if self.stdin_once && wrote_input {
            *self.stdin.lock() = None;
        }
    }
}

/// A reader that hands what it reads to the attached clients as well.
pub(crate) struct Tee<R> {
    pub(crate) inner: R,
    pub(crate) streams: Arc<Streams>,
    pub(crate) kind: u8,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.streams.broadcast(self.kind, &buf[..n]);
        }
        Ok(n)
    }
}

/// Receives the master side of a container's terminal from `runc create --console-socket`.
pub(crate) fn receive_terminal(listener: &UnixListener) -> std::io::Result<File> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    use std::mem::MaybeUninit;
    let (connection, _) = listener.accept()?;
    let mut name = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    recvmsg(
        &connection,
        &mut [std::io::IoSliceMut::new(&mut name)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(File::from(fd));
        }
    }
    Err(std::io::Error::other(
        "runc sent no terminal over the console socket",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_are_bounded() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDIN, b"hello").unwrap();
        write_frame(&mut buf, RESIZE, &[0, 80, 0, 24]).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((STDIN, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((RESIZE, vec![0, 80, 0, 24]))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let huge = [STDIN, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut huge.as_slice()).is_err());
    }

    #[test]
    fn clients_get_output_and_feed_input() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, writer) = std::io::pipe().unwrap();
        let streams = Streams::new(
            Some(File::from(std::os::fd::OwnedFd::from(writer))),
            None,
            true,
        );
        streams.serve(dir.path()).unwrap();
        let handle = File::open(dir.path()).unwrap();
        let mut client = UnixStream::connect(short_path(&handle, SOCKET)).unwrap();
        // The client is registered by the shim's thread; output sent before that is lost,
        // as for any attach.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while streams.clients.lock().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        streams.broadcast(STDOUT, b"out");
        assert_eq!(
            read_frame(&mut client).unwrap(),
            Some((STDOUT, b"out".to_vec()))
        );
        write_frame(&mut client, STDIN, b"typed\n").unwrap();
        let mut reader = std::io::BufReader::new(reader);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert_eq!(line, "typed\n");
        // stdinOnce: the first client leaving closes the container's input.
        drop(client);
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "stdin reached EOF");
        streams.close_all();
    }
}
