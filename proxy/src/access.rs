//! Access logs: one JSON object per request, off unless `http.access_log`
//! names a file. Each proxy thread keeps its own buffer and appends whole
//! lines to the file (opened with O_APPEND), when the buffer passes 64 KiB
//! and at least once a second, so threads never interleave within a line and
//! nothing is formatted per request while logging is off.

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Flushed when the buffer grows past this.
const FLUSH_AT: usize = 64 * 1024;

/// One request, as logged.
#[derive(Serialize)]
pub(crate) struct Entry<'a> {
    pub(crate) time: String,
    /// The `X-Request-Id` sent upstream (the client's, or the one the proxy added).
    pub(crate) request_id: &'a str,
    /// The route that matched (empty when none did).
    pub(crate) route: &'a str,
    pub(crate) client: IpAddr,
    pub(crate) protocol: &'a str,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    /// 0 when the client went away before a response.
    pub(crate) status: u16,
    pub(crate) service: &'a str,
    pub(crate) node: &'a str,
    pub(crate) endpoint: &'a str,
    /// Endpoints tried; `attempts - 1` were retries.
    pub(crate) attempts: usize,
    pub(crate) retries: usize,
    /// From the first byte of the request to the end of the response.
    pub(crate) duration_ms: f64,
    /// Of that, the last attempt's wait for its endpoint's response head
    /// (0 when none came).
    pub(crate) upstream_ms: f64,
}

/// A thread's access log writer.
struct AccessLog {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl AccessLog {
    fn open(path: &Path) -> io::Result<AccessLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(FLUSH_AT + 1024),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, entry: &Entry<'_>) {
        if serde_json::to_writer(&mut self.buf, entry).is_ok() {
            self.buf.push(b'\n');
        }
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Appends the buffered lines in one write.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot write the access log");
        }
        self.buf.clear();
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    /// This proxy thread's writer (HTTP/1.1 connections and the hyper tasks
    /// of a thread's current-thread runtime share it).
    static LOG: std::cell::RefCell<Option<AccessLog>> = const { std::cell::RefCell::new(None) };
}

/// Opens, switches or closes this thread's log to match `path`.
pub(crate) fn configure(path: Option<&Path>) {
    LOG.with_borrow_mut(|log| {
        if log.as_ref().map(AccessLog::path) == path {
            return;
        }
        *log = path.and_then(|path| match AccessLog::open(path) {
            Ok(opened) => Some(opened),
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot open the access log; requests are not logged");
                None
            }
        });
    });
}

/// Whether this thread logs requests.
pub(crate) fn enabled() -> bool {
    LOG.with_borrow(Option::is_some)
}

pub(crate) fn write(entry: &Entry<'_>) {
    LOG.with_borrow_mut(|log| {
        if let Some(log) = log {
            log.write(entry);
        }
    });
}

/// Writes out this thread's buffered lines.
pub(crate) fn flush() {
    LOG.with_borrow_mut(|log| {
        if let Some(log) = log {
            log.flush();
        }
    });
}

/// The current time as RFC 3339 with milliseconds (UTC).
pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Method and path from the first line of a forwarded head.
/// The value of header `name` (lowercase) in a request head, or "".
pub(crate) fn header<'a>(head: &'a [u8], name: &str) -> &'a str {
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
            return std::str::from_utf8(&line[colon + 1..]).map_or("", str::trim);
        }
    }
    ""
}

pub(crate) fn request_line(head: &[u8]) -> (&str, &str) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    (
        std::str::from_utf8(method).unwrap_or("?"),
        std::str::from_utf8(path).unwrap_or("?"),
    )
}
