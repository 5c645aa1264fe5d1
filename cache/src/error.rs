//! One error type for the cache, mapped to what a registry client sees: an OCI
//! error body with the right status. Internal details are logged once, never sent.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::oci::name::NameError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    NameUnknown(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    TagInvalid(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("upstream {upstream} is rate limiting")]
    TooManyRequests {
        upstream: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream {upstream} denied access: {detail}")]
    Denied { upstream: String, detail: String },
    #[error("upstream {upstream} is unavailable: {detail}")]
    UpstreamUnavailable { upstream: String, detail: String },
    #[error("upstream {upstream} sent a bad response: {detail}")]
    UpstreamInvalid { upstream: String, detail: String },
    /// The disk or the byte budget has no room: callers pass the content
    /// through uncached instead of failing.
    #[error("storage full: {0}")]
    StorageFull(String),
    #[error("not found")]
    NotFound,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NameInvalid(_) | Self::DigestInvalid(_) | Self::TagInvalid(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NameUnknown(_) | Self::ManifestUnknown(_) | Self::BlobUnknown(_) => {
                StatusCode::NOT_FOUND
            }
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            // Never 401: a runtime answered with a challenge would send node
            // pull secrets to us.
            Self::Denied { .. } => StatusCode::FORBIDDEN,
            Self::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamInvalid { .. } => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::StorageFull(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OCI error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NameInvalid(_) => "NAME_INVALID",
            Self::NameUnknown(_) => "NAME_UNKNOWN",
            Self::DigestInvalid(_) => "DIGEST_INVALID",
            Self::TagInvalid(_) => "MANIFEST_INVALID",
            Self::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            Self::BlobUnknown(_) => "BLOB_UNKNOWN",
            Self::Unsupported(_) => "UNSUPPORTED",
            Self::RangeNotSatisfiable { .. } => "RANGE_INVALID",
            Self::TooManyRequests { .. } => "TOOMANYREQUESTS",
            Self::Denied { .. } => "DENIED",
            Self::UpstreamUnavailable { .. } | Self::UpstreamInvalid { .. } => "UNAVAILABLE",
            Self::NotFound => "NOT_FOUND",
            Self::Internal(_) | Self::StorageFull(_) => "UNKNOWN",
        }
    }

    /// The message a client may see: everything but internal details.
    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) | Self::StorageFull(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether a cached copy should be served instead of this error.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            Self::TooManyRequests { .. }
                | Self::Denied { .. }
                | Self::UpstreamUnavailable { .. }
                | Self::UpstreamInvalid { .. }
        )
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidName(_) => Self::NameInvalid(e.to_string()),
            NameError::InvalidTag(_) => Self::TagInvalid(e.to_string()),
            NameError::Digest(d) => Self::DigestInvalid(d.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::internal(e)
    }
}

/// The OCI error body, `{"errors":[{"code","message"}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}).to_string()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut resp = (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            error_body(self.code(), &self.public_message()),
        )
            .into_response();
        let headers = resp.headers_mut();
        match &self {
            Self::TooManyRequests {
                retry_after: Some(d),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
            }
            Self::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            Self::Unsupported(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            _ => {}
        }
        resp
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
