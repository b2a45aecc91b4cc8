use std::path::PathBuf;

/// Everything that can go wrong in the image store. Messages name the file and the digests
/// involved, because the usual reader is an operator looking at an agent log.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("invalid digest {0:?} (only sha256:<64 lowercase hex> is supported)")]
    InvalidDigest(String),

    #[error("malformed image archive {archive}: {reason}")]
    BadArchive { archive: PathBuf, reason: String },

    #[error("malformed {what}: {source}")]
    BadJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("unsafe layer {layer}: {reason}")]
    UnsafeLayer { layer: String, reason: String },

    #[error("bad layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },

    #[error("image {0:?} not found")]
    NotFound(String),

    #[error("no manifest for platform {platform} in image index {digest}")]
    NoMatchingPlatform { digest: String, platform: String },

    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),

    #[error("registry error for {reference}: {message}")]
    Registry { reference: String, message: String },

    #[error("corrupt image store index {path}: {reason}")]
    CorruptIndex { path: PathBuf, reason: String },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        ImageError::BadJson {
            what: what.into(),
            source,
        }
    }

    /// True when the error only says that the image does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageError::NotFound(_))
    }
}

/// Attaches a path to an `io::Result`, since bare `io::Error`s do not say which file failed.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(path, e))
    }
}
