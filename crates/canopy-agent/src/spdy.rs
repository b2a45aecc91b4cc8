//! The SPDY/3.1 framing that kubectl's port-forward falls back to when a WebSocket upgrade
//! is refused (and that kubectl before 1.30 uses for everything): frames, and the header
//! blocks compressed with one zlib stream per direction preset with SPDY/3's dictionary.
//!
//! Only what a stream server needs: reading every frame type (unknown ones are skipped),
//! writing SYN_REPLY, DATA, RST_STREAM, PING and GOAWAY. Like the Go client (spdystream),
//! flow-control windows are not enforced.

use std::sync::LazyLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

const VERSION: u16 = 3;
pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status: the stream was refused.
pub const REFUSED_STREAM: u32 = 3;

/// Control frames are small; a larger one is an attack or a bug.
const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Decompressed header blocks are bounded too (a zlib bomb is a few bytes).
const MAX_HEADER_BLOCK: usize = 256 << 10;

/// SPDY/3's header-compression dictionary (draft 3, 2.6.10.1): length-prefixed header names
/// and values, then common values; 1423 bytes, Adler-32 0xe3c6a7c2.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &[&str] = &[
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
        "503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
        "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
        "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    ];
    let mut out = Vec::with_capacity(1423);
    for word in WORDS {
        out.extend_from_slice(&(word.len() as u32).to_be_bytes());
        out.extend_from_slice(word.as_bytes());
    }
    for part in TAIL {
        out.extend_from_slice(part.as_bytes());
    }
    out
});

/// A frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        flags: u8,
        headers: Vec<(String, String)>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY from a client: nothing a server acts on.
    Other,
}

/// Why a session ends.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

fn protocol(message: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(message.into())
}

/// One direction's header decompression, for the whole session.
pub struct HeaderReader {
    inflate: Decompress,
}

impl Default for HeaderReader {
    fn default() -> Self {
        HeaderReader {
            inflate: Decompress::new(true),
        }
    }
}

impl HeaderReader {
    fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(4096);
        let mut consumed = 0usize;
        let mut idle_rounds = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(protocol("header block too large"));
                }
                out.reserve(out.len().max(4096));
            }
            let (before_in, before_out) = (self.inflate.total_in(), out.len());
            let result =
                self.inflate
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.inflate.total_in() - before_in) as usize;
            if self.inflate.total_in() == before_in && out.len() == before_out {
                idle_rounds += 1;
                if idle_rounds > 2 {
                    return Err(protocol("header block makes no progress"));
                }
            }
            match result {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) if consumed >= input.len() && out.len() < out.capacity() => {
                    return Ok(out);
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| protocol(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(protocol(format!("header block: {e}"))),
            }
        }
    }

    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let raw = self.decompress(block)?;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], SpdyError> {
            let slice = raw
                .get(at..at + n)
                .ok_or_else(|| protocol("truncated header block"))?;
            at += n;
            Ok(slice)
        };
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let count = word(take(4)?);
        let mut headers = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let len = word(take(4)?);
            let name = String::from_utf8_lossy(take(len)?).to_ascii_lowercase();
            let len = word(take(4)?);
            let value = String::from_utf8_lossy(take(len)?).into_owned();
            for v in value.split('\0') {
                headers.push((name.clone(), v.to_string()));
            }
        }
        Ok(headers)
    }
}

/// Reads one frame.
pub async fn read_frame(
    reader: &mut (impl AsyncRead + Unpin),
    headers: &mut HeaderReader,
) -> Result<Frame, SpdyError> {
    let mut head = [0u8; 8];
    reader.read_exact(&mut head).await?;
    let flags = head[4];
    let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let control = head[0] & 0x80 != 0;
    if control && length > MAX_CONTROL_FRAME {
        return Err(protocol(format!("control frame of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    if !control {
        let stream_id = u32::from_be_bytes([head[0] & 0x7f, head[1], head[2], head[3]]);
        return Ok(Frame::Data {
            stream_id,
            flags,
            data: body,
        });
    }
    let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
    if version != VERSION {
        return Err(protocol(format!("SPDY version {version} (3 is spoken)")));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    let word = |at: usize| -> Result<u32, SpdyError> {
        body.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| protocol("truncated control frame"))
    };
    Ok(match kind {
        TYPE_SYN_STREAM => {
            let stream_id = word(0)? & 0x7fff_ffff;
            // associated stream id (4), priority and slot (2), then the header block.
            let block = body
                .get(10..)
                .ok_or_else(|| protocol("truncated SYN_STREAM"))?;
            Frame::SynStream {
                stream_id,
                flags,
                headers: headers.headers(block)?,
            }
        }
        TYPE_RST_STREAM => Frame::RstStream {
            stream_id: word(0)? & 0x7fff_ffff,
            status: word(4)?,
        },
        TYPE_PING => Frame::Ping { id: word(0)? },
        TYPE_GOAWAY => Frame::GoAway,
        // Header blocks of other frames still advance the shared zlib stream.
        TYPE_SYN_REPLY | 8 => {
            if let Some(block) = body.get(4..) {
                headers.headers(block)?;
            }
            Frame::Other
        }
        _ => Frame::Other,
    })
}

/// One direction's header compression, for the whole session.
pub struct HeaderWriter {
    deflate: Compress,
}

impl Default for HeaderWriter {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // The dictionary is set before the first byte, which puts its id in the stream
        // header as SPDY requires.
        let _ = deflate.set_dictionary(&DICTIONARY);
        HeaderWriter { deflate }
    }
}

impl HeaderWriter {
    fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut consumed = 0usize;
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            let _ = self
                .deflate
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync);
            consumed += (self.deflate.total_in() - before) as usize;
            // A sync flush is complete once all input is in and the output did not fill up.
            if consumed >= raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }

    /// A SYN_REPLY accepting a stream.
    pub fn syn_reply(&mut self, stream_id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = self.block(headers);
        let mut body = stream_id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        control(TYPE_SYN_REPLY, 0, &body)
    }
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    let length = (body.len() as u32).to_be_bytes();
    out.push(flags);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(body);
    out
}

/// A DATA frame (`fin` ends our side of the stream).
pub fn data(stream_id: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    let length = (payload.len() as u32).to_be_bytes();
    out.push(if fin { FLAG_FIN } else { 0 });
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(payload);
    out
}

/// A RST_STREAM.
pub fn rst_stream(stream_id: u32, status: u32) -> Vec<u8> {
    let mut body = stream_id.to_be_bytes().to_vec();
    body.extend_from_slice(&status.to_be_bytes());
    control(TYPE_RST_STREAM, 0, &body)
}

/// A PING (echoed with the client's id).
pub fn ping(id: u32) -> Vec<u8> {
    control(TYPE_PING, 0, &id.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for byte in DICTIONARY.iter() {
            a = (a + *byte as u32) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(
            (b << 16) | a,
            0xe3c6_a7c2,
            "Adler-32, the id in every header block"
        );
    }

    fn syn_stream(writer: &mut HeaderWriter, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = writer.block(headers);
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&block);
        control(TYPE_SYN_STREAM, 0, &body)
    }

    #[tokio::test]
    async fn frames_round_trip_with_a_shared_compression_stream() {
        let mut client = HeaderWriter::default();
        let mut bytes = syn_stream(
            &mut client,
            1,
            &[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0"),
            ],
        );
        bytes.extend(syn_stream(
            &mut client,
            3,
            &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
        ));
        bytes.extend(data(3, true, b"hello"));
        bytes.extend(ping(7));
        bytes.extend(rst_stream(1, REFUSED_STREAM));
        let mut reader = HeaderReader::default();
        let mut input = bytes.as_slice();
        let first = read_frame(&mut input, &mut reader).await.unwrap();
        assert_eq!(
            first,
            Frame::SynStream {
                stream_id: 1,
                flags: 0,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "8080".into()),
                    ("requestid".into(), "0".into())
                ]
            }
        );
        let Frame::SynStream { headers, .. } = read_frame(&mut input, &mut reader).await.unwrap()
        else {
            panic!("not a SYN_STREAM")
        };
        assert_eq!(headers[0], ("streamtype".into(), "data".into()));
        assert_eq!(
            read_frame(&mut input, &mut reader).await.unwrap(),
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(
            read_frame(&mut input, &mut reader).await.unwrap(),
            Frame::Ping { id: 7 }
        );
        assert_eq!(
            read_frame(&mut input, &mut reader).await.unwrap(),
            Frame::RstStream {
                stream_id: 1,
                status: REFUSED_STREAM
            }
        );
    }

    #[tokio::test]
    async fn hostile_frames_are_refused() {
        let mut reader = HeaderReader::default();
        let mut huge = control(TYPE_SYN_STREAM, 0, &[]);
        huge[5] = 0xff;
        assert!(read_frame(&mut huge.as_slice(), &mut reader).await.is_err());
        let garbage = control(TYPE_SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        assert!(
            read_frame(&mut garbage.as_slice(), &mut reader)
                .await
                .is_err()
        );
        let mut wrong_version = ping(1);
        wrong_version[1] = 2;
        assert!(
            read_frame(&mut wrong_version.as_slice(), &mut HeaderReader::default())
                .await
                .is_err()
        );
    }
}
