//! Extractors whose rejections are our own problem responses.
//!
//! axum's `Json` rejects with plain-text bodies; wrapping it keeps every failure
//! of the API in the problem+json shape with a stable code: malformed JSON 400,
//! wrong types or unknown fields 422, wrong Content-Type 415, too large 413.

use axum::{
    extract::{rejection::JsonRejection, FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body, deserialized into `T`.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(map_rejection(rejection)),
        }
    }
}

fn map_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field and the expected type, never echoes a
            // whole value; the body text itself is not included.
            ApiError::validation("body", e.body_text().trim_start_matches("Failed to deserialize the JSON body into the target type: "))
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::MalformedBody("the body is not valid JSON".into())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge
        }
        other => ApiError::MalformedBody(other.body_text()),
    }
}
