//! A small axum app protected by auth-client.
//!
//! ```sh
//! AUTH_URL=http://localhost:8080 cargo run -p auth-client --example protected-app
//! ```
//!
//! | route | who may call it |
//! | --- | --- |
//! | `GET /` | anyone |
//! | `GET /me` | any valid access token: answers its claims |
//! | `GET /admin` | tokens with `auth:admin` (checked by the `require_permission` layer) |
//! | `GET /reports` | tokens with `reports:read` (checked in the handler) |
//!
//! Environment: `AUTH_URL` (default `http://localhost:8080`), `APP_LISTEN`
//! (default `127.0.0.1:3000`), `AUTH_VALIDATION` = `local` (default), `remote`
//! or `remote-with-fallback`.

use std::error::Error;

use auth_client::{
    require_permission, AuthClient, AuthLayer, AuthRejection, AuthUser, Claims, ValidationMode,
};
use axum::{routing::get, Json, Router};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let auth_url = std::env::var("AUTH_URL").unwrap_or_else(|_| "http://localhost:8080".into());
    let listen = std::env::var("APP_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let mode = match std::env::var("AUTH_VALIDATION").as_deref() {
        Err(_) | Ok("local") => ValidationMode::Local,
        Ok("remote") => ValidationMode::Remote,
        Ok("remote-with-fallback") => ValidationMode::RemoteWithLocalFallback,
        Ok(other) => return Err(format!("AUTH_VALIDATION: unknown mode {other:?}").into()),
    };
    let client = AuthClient::builder(auth_url.as_str()).mode(mode).build()?;
    // Warm the key cache; if the service is not up yet, the first request retries.
    if let Err(e) = client.prefetch_keys().await {
        eprintln!("warning: cannot fetch the signing keys from {auth_url} yet: {e}");
    }

    let protected = Router::new()
        .route("/me", get(me))
        .route(
            "/admin",
            get(admin).route_layer(require_permission("auth:admin")),
        )
        .route("/reports", get(reports))
        .layer(AuthLayer::new(client));
    let app = Router::new().route("/", get(index)).merge(protected);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!(
        "protected-app on http://{} (auth-service at {auth_url}, {mode:?} validation)",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn index() -> &'static str {
    "public: no token needed\n"
}

async fn me(AuthUser(claims): AuthUser) -> Json<Claims> {
    Json(claims)
}

async fn admin(user: AuthUser) -> String {
    format!("hello, administrator {}\n", user.username)
}

async fn reports(user: AuthUser) -> Result<String, AuthRejection> {
    user.require_permission("reports:read")?;
    Ok(format!("reports for {}\n", user.username))
}
