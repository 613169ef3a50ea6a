//! The storage suite: every check below runs against PostgreSQL (a fresh database
//! per test) and against embedded SQLite (a fresh file per test), through the same
//! `Database` the service uses, so the two backends are held to one behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, time::Duration};

use auth_service::{
    config::Config,
    store::{Database, IdentityStore, StoreError, StoredKey},
    users::{
        AuditEvent, AuditQuery, AuthzVersion, NewUser, Role, RoleUpdate, StoredAuditEvent,
        UserUpdate,
    },
};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::kit;

/// A well-formed PHC string; the store never looks inside it.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA";

fn connect(mut config: Config) -> Database {
    // These tests are about what the stores do, not about timeouts: a slow CI
    // machine building databases in parallel must not trip the guard.
    config.dependency_timeout = Duration::from_secs(10);
    Database::connect_lazy(&config).unwrap()
}

async fn postgres_at(url: &str) -> Database {
    connect(kit::postgres_config(url))
}

async fn postgres() -> Database {
    let db = postgres_at(&kit::fresh_database().await).await;
    db.migrate().await.unwrap();
    db
}

/// The directory must outlive the store.
async fn sqlite() -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let db = connect(kit::embedded_config(dir.path()));
    db.migrate().await.unwrap();
    (dir, db)
}

/// Generates, for each check, one test per backend: `storage::postgres::<check>`
/// and `storage::sqlite::<check>`.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(&super::postgres().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let (_dir, db) = super::sqlite().await;
                    super::$check(&db).await;
                }
            )*
        }
    };
}

on_both_backends!(
    users_are_created_and_found_case_insensitively,
    duplicates_and_unknown_roles_are_refused,
    updates_apply_field_by_field,
    deleted_users_are_gone,
    users_page_by_cursor_and_filter_literally,
    roles_and_their_permissions,
    mutations_are_audited_in_their_transaction,
    configuration_changes_move_the_version,
    signing_keys_are_added_only_over_the_expected_newest,
    the_first_user_is_created_once,
    the_last_administrator_stays,
    authorization_versions_rise_with_every_change_of_privilege,
    audit_events_filter_page_and_prune,
);

fn new_user(username: &str, email: Option<&str>, roles: &[&str]) -> NewUser {
    NewUser {
        username: username.to_owned(),
        email: email.map(str::to_owned),
        password_hash: HASH.to_owned(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn role(name: &str, permissions: &[&str]) -> Role {
    Role {
        name: name.to_owned(),
        description: format!("the {name} role"),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
    }
}

fn audit(kind: &'static str) -> AuditEvent {
    AuditEvent::new(kind, "success")
}

/// The newest `limit` audit events.
async fn recent(
    store: &impl IdentityStore,
    limit: u32,
) -> Result<Vec<StoredAuditEvent>, StoreError> {
    store
        .audit_events(&AuditQuery {
            limit,
            ..Default::default()
        })
        .await
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

async fn users_are_created_and_found_case_insensitively(store: &impl IdentityStore) {
    store
        .create_role(
            &role("reader", &["docs:read", "a:b"]),
            &audit("role.created"),
        )
        .await
        .unwrap();
    store
        .create_role(
            &role("writer", &["docs:write", "docs:read"]),
            &audit("role.created"),
        )
        .await
        .unwrap();

    let created = store
        .create_user(
            &new_user(
                "Alice",
                Some("Alice@Example.com"),
                &["writer", "reader", "writer"],
            ),
            &audit("user.created"),
        )
        .await
        .unwrap();
    assert_eq!(created.username, "Alice");
    assert_eq!(created.email.as_deref(), Some("Alice@Example.com"));
    assert!(!created.disabled);
    // Sorted, and the permissions are the distinct union of the roles'.
    assert_eq!(created.roles, strings(&["reader", "writer"]));
    assert_eq!(
        created.permissions,
        strings(&["a:b", "docs:read", "docs:write"])
    );
    assert_eq!(created.created_at, created.password_changed_at);

    assert_eq!(
        store.get_user(created.id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.get_user(uuid::Uuid::new_v4()).await.unwrap(), None);

    let credentials = store.find_credentials("aLICE").await.unwrap().unwrap();
    assert_eq!(credentials.user, created);
    assert_eq!(credentials.password_hash, HASH);
    assert!(store.find_credentials("alic").await.unwrap().is_none());

    // A user without roles has none, and no permissions.
    let plain = store
        .create_user(&new_user("bob", None, &[]), &audit("user.created"))
        .await
        .unwrap();
    assert!(plain.roles.is_empty() && plain.permissions.is_empty());
    assert_eq!(store.count_users().await.unwrap(), 2);
}

async fn duplicates_and_unknown_roles_are_refused(store: &impl IdentityStore) {
    store
        .create_user(
            &new_user("Carol", Some("carol@example.com"), &[]),
            &audit("user.created"),
        )
        .await
        .unwrap();

    let err = store
        .create_user(&new_user("cAROL", None, &[]), &audit("user.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "username"),
        "{err:?}"
    );

    let err = store
        .create_user(
            &new_user("carol2", Some("CAROL@example.com"), &[]),
            &audit("user.created"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "email"),
        "{err:?}"
    );

    // Many users may have no email.
    store
        .create_user(&new_user("dave", None, &[]), &audit("user.created"))
        .await
        .unwrap();
    store
        .create_user(&new_user("erin", None, &[]), &audit("user.created"))
        .await
        .unwrap();

    store
        .create_role(&role("known", &["p"]), &audit("role.created"))
        .await
        .unwrap();
    let err = store
        .create_user(
            &new_user("frank", None, &["known", "ghost"]),
            &audit("user.created"),
        )
        .await
        .unwrap_err();
    let unknown_ghost = |m: &str| m == "unknown role: ghost";
    assert!(
        matches!(&err, StoreError::Invalid { field: "roles", message } if unknown_ghost(message)),
        "{err:?}"
    );
    // Nothing of the refused creations was kept.
    assert_eq!(store.count_users().await.unwrap(), 3);
    assert!(store.find_credentials("frank").await.unwrap().is_none());
}

async fn updates_apply_field_by_field(store: &impl IdentityStore) {
    store
        .create_role(&role("one", &["p1"]), &audit("role.created"))
        .await
        .unwrap();
    store
        .create_role(&role("two", &["p2", "p3"]), &audit("role.created"))
        .await
        .unwrap();
    let user = store
        .create_user(
            &new_user("grace", Some("grace@example.com"), &["one"]),
            &audit("user.created"),
        )
        .await
        .unwrap();
    store
        .create_user(
            &new_user("heidi", Some("heidi@example.com"), &[]),
            &audit("user.created"),
        )
        .await
        .unwrap();

    // Nothing to change still proves existence and bumps updated_at only.
    let same = store
        .update_user(user.id, &UserUpdate::default(), &audit("user.updated"))
        .await
        .unwrap();
    assert_eq!(
        (same.email.as_deref(), same.disabled, &same.roles),
        (Some("grace@example.com"), false, &user.roles)
    );
    assert!(same.updated_at >= user.updated_at);

    let updated = store
        .update_user(
            user.id,
            &UserUpdate {
                email: Some(None),
                disabled: Some(true),
                roles: Some(strings(&["two"])),
                password_hash: None,
            },
            &audit("user.updated"),
        )
        .await
        .unwrap();
    assert_eq!(updated.email, None);
    assert!(updated.disabled);
    assert_eq!(updated.roles, strings(&["two"]));
    assert_eq!(updated.permissions, strings(&["p2", "p3"]));
    assert_eq!(updated.password_changed_at, user.password_changed_at);
    assert_eq!(
        store.get_user(user.id).await.unwrap(),
        Some(updated.clone())
    );

    // A new password hash moves password_changed_at.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let new_hash = HASH.replace("aGFzaGhh", "bmV3aGFz");
    let rehashed = store
        .update_user(
            user.id,
            &UserUpdate {
                password_hash: Some(new_hash.clone()),
                ..Default::default()
            },
            &audit("user.password_reset"),
        )
        .await
        .unwrap();
    assert!(rehashed.password_changed_at > updated.password_changed_at);
    assert!(rehashed.disabled, "fields not in the update are left alone");
    assert_eq!(
        store
            .find_credentials("grace")
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        new_hash
    );

    // A rehash on login replaces the hash it verified and nothing else ...
    let upgraded_hash = HASH.replace("m=19456", "m=65536");
    assert!(store
        .replace_password_hash(user.id, &new_hash, &upgraded_hash)
        .await
        .unwrap());
    let credentials = store.find_credentials("grace").await.unwrap().unwrap();
    assert_eq!(credentials.password_hash, upgraded_hash);
    assert_eq!(credentials.user, rehashed);
    // ... and never a hash set since (a reset landing during the rehash).
    assert!(!store
        .replace_password_hash(user.id, &new_hash, HASH)
        .await
        .unwrap());
    assert_eq!(
        store
            .find_credentials("grace")
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        upgraded_hash
    );

    // A refused update changes nothing, not even the fields that were fine.
    let err = store
        .update_user(
            user.id,
            &UserUpdate {
                disabled: Some(false),
                roles: Some(strings(&["one", "ghost"])),
                ..Default::default()
            },
            &audit("user.updated"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid { field: "roles", .. }),
        "{err:?}"
    );
    let err = store
        .update_user(
            user.id,
            &UserUpdate {
                email: Some(Some("HEIDI@example.com".into())),
                ..Default::default()
            },
            &audit("user.updated"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "email"),
        "{err:?}"
    );
    assert_eq!(store.get_user(user.id).await.unwrap(), Some(rehashed));

    let missing = uuid::Uuid::new_v4();
    let err = store
        .update_user(missing, &UserUpdate::default(), &audit("user.updated"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(!store
        .replace_password_hash(missing, HASH, HASH)
        .await
        .unwrap());
}

async fn deleted_users_are_gone(store: &impl IdentityStore) {
    store
        .create_role(&role("r", &["p"]), &audit("role.created"))
        .await
        .unwrap();
    let user = store
        .create_user(&new_user("ivan", None, &["r"]), &audit("user.created"))
        .await
        .unwrap();
    store
        .delete_user(user.id, &audit("user.deleted"))
        .await
        .unwrap();
    assert_eq!(store.get_user(user.id).await.unwrap(), None);
    assert!(store.find_credentials("ivan").await.unwrap().is_none());
    let err = store
        .delete_user(user.id, &audit("user.deleted"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    // The role stays; the name is free again.
    assert!(store.get_role("r").await.unwrap().is_some());
    store
        .create_user(&new_user("IVAN", None, &["r"]), &audit("user.created"))
        .await
        .unwrap();
}

/// Pages through `filter` with `limit` and returns the usernames in order.
async fn all_pages(store: &impl IdentityStore, filter: Option<&str>, limit: u32) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = store
            .list_users(filter, cursor.as_deref(), limit)
            .await
            .unwrap();
        assert!(page.users.len() <= limit as usize);
        names.extend(page.users.iter().map(|u| u.username.clone()));
        match page.next_cursor {
            Some(next) => {
                assert_eq!(
                    page.users.len(),
                    limit as usize,
                    "only a full page has a next one"
                );
                cursor = Some(next);
            }
            None => return names,
        }
    }
    panic!("pagination did not end");
}

async fn users_page_by_cursor_and_filter_literally(store: &impl IdentityStore) {
    let names = [
        "alpha",
        "Bravo",
        "charlie",
        "delta",
        "echo",
        "50%off",
        "under_score",
        r"back\slash",
    ];
    for name in names {
        store
            .create_user(&new_user(name, None, &[]), &audit("user.created"))
            .await
            .unwrap();
    }

    let everyone = store.list_users(None, None, 100).await.unwrap();
    assert_eq!(everyone.next_cursor, None);
    let everyone: Vec<String> = everyone.users.into_iter().map(|u| u.username).collect();
    assert_eq!(
        everyone.iter().collect::<BTreeSet<_>>(),
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<BTreeSet<_>>()
            .iter()
            .collect()
    );
    // Ordered by lower-cased name: "Bravo" sorts between "alpha" and "charlie".
    let letters: Vec<&String> = everyone
        .iter()
        .filter(|n| n.chars().all(|c| c.is_ascii_alphabetic()))
        .collect();
    assert_eq!(letters, ["alpha", "Bravo", "charlie", "delta", "echo"]);

    // Every page size walks the same list, each user once, including when the
    // last page is exactly full (8 = 2 x 4).
    for limit in [1, 3, 4, 7, 8, 9] {
        assert_eq!(
            all_pages(store, None, limit).await,
            everyone,
            "limit {limit}"
        );
    }
    // A cursor in another letter case works the same.
    let after_bravo = store.list_users(None, Some("BRAVO"), 100).await.unwrap();
    assert!(!after_bravo
        .users
        .iter()
        .any(|u| ["alpha", "Bravo"].contains(&u.username.as_str())));
    assert!(after_bravo.users.iter().any(|u| u.username == "charlie"));

    // Filters are case-insensitive literal substrings, also across pages.
    let with_a: BTreeSet<String> = all_pages(store, Some("A"), 2).await.into_iter().collect();
    assert_eq!(
        with_a,
        ["alpha", "Bravo", "charlie", "delta", r"back\slash"]
            .map(String::from)
            .into()
    );
    assert_eq!(all_pages(store, Some("%"), 10).await, ["50%off"]);
    assert_eq!(all_pages(store, Some("_"), 10).await, ["under_score"]);
    assert_eq!(all_pages(store, Some("\\"), 10).await, [r"back\slash"]);
    // As LIKE patterns these would match "alpha" and everyone.
    assert!(all_pages(store, Some("a_p"), 10).await.is_empty());
    assert!(all_pages(store, Some("%%"), 10).await.is_empty());
    assert_eq!(all_pages(store, Some(""), 3).await, everyone);
}

async fn roles_and_their_permissions(store: &impl IdentityStore) {
    let created = store
        .create_role(
            &role("editor", &["doc:write", "doc:read", "doc:write"]),
            &audit("role.created"),
        )
        .await
        .unwrap();
    assert_eq!(created.permissions, strings(&["doc:read", "doc:write"]));
    assert_eq!(created.description, "the editor role");
    let err = store
        .create_role(&role("editor", &[]), &audit("role.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "role"),
        "{err:?}"
    );
    store
        .create_role(&role("auditor", &[]), &audit("role.created"))
        .await
        .unwrap();

    assert_eq!(
        store.get_role("editor").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.get_role("nobody").await.unwrap(), None);
    let names: Vec<String> = store
        .list_roles()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["auditor", "editor"]);

    let user = store
        .create_user(&new_user("judy", None, &["editor"]), &audit("user.created"))
        .await
        .unwrap();
    assert_eq!(user.permissions, strings(&["doc:read", "doc:write"]));

    // Description only: permissions stay, and no holder's authorization changes.
    let (described, bumped) = store
        .update_role(
            "editor",
            &RoleUpdate {
                description: Some("edits".into()),
                permissions: None,
            },
            &audit("role.updated"),
        )
        .await
        .unwrap();
    assert_eq!(described.description, "edits");
    assert_eq!(described.permissions, created.permissions);
    assert!(bumped.is_empty());
    // Permissions replaced; the user's permissions follow at once, and the
    // holders' authorization versions rise.
    let (replaced, bumped) = store
        .update_role(
            "editor",
            &RoleUpdate {
                description: None,
                permissions: Some(strings(&["doc:publish"])),
            },
            &audit("role.updated"),
        )
        .await
        .unwrap();
    assert_eq!(
        (replaced.description.as_str(), replaced.permissions.clone()),
        ("edits", strings(&["doc:publish"]))
    );
    let holder = store.get_user(user.id).await.unwrap().unwrap();
    assert_eq!(holder.permissions, strings(&["doc:publish"]));
    assert_eq!(
        bumped,
        [AuthzVersion {
            user_id: user.id,
            version: user.authz_version + 1
        }]
    );
    assert_eq!(holder.authz_version, user.authz_version + 1);
    let err = store
        .update_role("nobody", &RoleUpdate::default(), &audit("role.updated"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // Deleting a role takes it from its users, and its permissions with it.
    let bumped = store
        .delete_role("editor", &audit("role.deleted"))
        .await
        .unwrap();
    assert_eq!(bumped.len(), 1);
    assert_eq!(bumped[0].version, holder.authz_version + 1);
    assert_eq!(store.get_role("editor").await.unwrap(), None);
    let user = store.get_user(user.id).await.unwrap().unwrap();
    assert!(
        user.roles.is_empty() && user.permissions.is_empty(),
        "{user:?}"
    );
    let err = store
        .delete_role("editor", &audit("role.deleted"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    // A new role of the same name starts empty: the old permissions are gone.
    let again = store
        .create_role(&role("editor", &[]), &audit("role.created"))
        .await
        .unwrap();
    assert!(again.permissions.is_empty());
}

async fn mutations_are_audited_in_their_transaction(store: &impl IdentityStore) {
    store
        .create_role(&role("staff", &["p"]), &audit("role.created"))
        .await
        .unwrap();
    let user = store
        .create_user(
            &new_user("kim", None, &["staff"]),
            &audit("user.created").ip(Some([10, 0, 0, 7].into())),
        )
        .await
        .unwrap();
    // A refused change leaves no record.
    store
        .create_user(&new_user("KIM", None, &[]), &audit("user.created"))
        .await
        .unwrap_err();
    store
        .update_user(
            user.id,
            &UserUpdate {
                disabled: Some(true),
                ..Default::default()
            },
            &audit("user.updated").user(user.id, "kim"),
        )
        .await
        .unwrap();
    store
        .set_configuration(
            "lockout_threshold",
            &json!(7),
            &audit("config.changed").detail(json!({"key": "lockout_threshold"})),
        )
        .await
        .unwrap();
    store
        .record_audit(
            &AuditEvent::new("login", "failure")
                .username("nobody")
                .detail(json!({"reason": "unknown user"})),
        )
        .await
        .unwrap();
    store
        .delete_user(user.id, &audit("user.deleted").user(user.id, "kim"))
        .await
        .unwrap();
    store
        .delete_role("staff", &audit("role.deleted"))
        .await
        .unwrap();

    let events = recent(store, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "role.deleted",
            "user.deleted",
            "login",
            "config.changed",
            "user.updated",
            "user.created",
            "role.created"
        ],
        "newest first"
    );
    assert!(events
        .windows(2)
        .all(|w| w[0].id > w[1].id && w[0].occurred_at >= w[1].occurred_at));
    // The creation is recorded about the new user, whose id only the store knew.
    let creation = &events[5];
    assert_eq!(
        (creation.user_id, creation.username.as_deref()),
        (Some(user.id), Some("kim"))
    );
    assert_eq!(creation.client_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!(creation.outcome, "success");
    let login = &events[2];
    assert_eq!(
        (
            login.user_id,
            login.username.as_deref(),
            login.outcome.as_str()
        ),
        (None, Some("nobody"), "failure")
    );
    assert_eq!(login.detail, json!({"reason": "unknown user"}));
    assert_eq!(events[3].detail, json!({"key": "lockout_threshold"}));
    // The events outlive the user.
    assert_eq!(events[1].user_id, Some(user.id));

    assert_eq!(recent(store, 2).await.unwrap().len(), 2);

    // An event about someone else (the acting administrator) is kept as it was.
    let by_admin = AuditEvent::new("user.created", "success").username("root");
    store
        .create_user(&new_user("lee", None, &[]), &by_admin)
        .await
        .unwrap();
    let event = &recent(store, 1).await.unwrap()[0];
    assert_eq!(
        (event.user_id, event.username.as_deref()),
        (None, Some("root"))
    );
}

async fn configuration_changes_move_the_version(store: &impl IdentityStore) {
    assert!(store.load_configuration().await.unwrap().is_empty());
    let mut seen = BTreeSet::new();
    let v0 = store.configuration_version().await.unwrap();
    assert_eq!(
        store.configuration_version().await.unwrap(),
        v0,
        "stable while nothing changes"
    );
    seen.insert(v0);

    store
        .set_configuration(
            "registration_enabled",
            &json!(true),
            &audit("config.changed"),
        )
        .await
        .unwrap();
    assert!(
        seen.insert(store.configuration_version().await.unwrap()),
        "insert changes it"
    );
    // Changing an existing key right away (the count stays the same) changes it too.
    store
        .set_configuration(
            "registration_enabled",
            &json!(false),
            &audit("config.changed"),
        )
        .await
        .unwrap();
    assert!(
        seen.insert(store.configuration_version().await.unwrap()),
        "update changes it"
    );
    store
        .set_configuration(
            "password_min_length",
            &json!({"nested": [1, 2.5, "x", null]}),
            &audit("config.changed"),
        )
        .await
        .unwrap();
    assert!(seen.insert(store.configuration_version().await.unwrap()));

    assert_eq!(
        store.load_configuration().await.unwrap(),
        vec![
            (
                "password_min_length".to_owned(),
                json!({"nested": [1, 2.5, "x", null]})
            ),
            ("registration_enabled".to_owned(), json!(false)),
        ]
    );
    let kinds: Vec<String> = store
        .audit_events(&AuditQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["config.changed"; 3]);
}

fn key(kid: &str, created: i64, activates: i64) -> StoredKey {
    let at = |secs| DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 123_456_000).unwrap();
    StoredKey {
        kid: kid.to_owned(),
        algorithm: "EdDSA".to_owned(),
        public_key: vec![1, 2, 3, 0, 255],
        private_key_encrypted: format!("sealed {kid}").into_bytes(),
        created_at: at(created),
        activates_at: at(activates),
    }
}

async fn signing_keys_are_added_only_over_the_expected_newest(store: &impl IdentityStore) {
    assert!(store.signing_keys().await.unwrap().is_empty());
    let k1 = key("k1", 0, 0);
    let k2 = key("k2", 10, 3600);
    let k3 = key("k3", 20, 7200);

    assert!(store.add_signing_key(&k1, None).await.unwrap());
    // A replica that still believes there is no key loses.
    assert!(!store.add_signing_key(&k2, None).await.unwrap());
    assert!(store.add_signing_key(&k2, Some("k1")).await.unwrap());
    // Stale: k2 is the newest now.
    assert!(!store.add_signing_key(&k3, Some("k1")).await.unwrap());
    assert_eq!(
        store.signing_keys().await.unwrap(),
        vec![k1.clone(), k2.clone()],
        "oldest activation first"
    );

    // "Newest" goes by activation, not by creation.
    let early = key("early", 30, 1800);
    assert!(!store.add_signing_key(&early, Some("k1")).await.unwrap());
    assert!(store.add_signing_key(&early, Some("k2")).await.unwrap());
    assert!(store.add_signing_key(&k3, Some("k2")).await.unwrap());
    let kids: Vec<String> = store
        .signing_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, ["k1", "early", "k2", "k3"]);

    let err = store
        .add_signing_key(&key("k1", 40, 9000), Some("k3"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "kid"),
        "{err:?}"
    );

    store
        .delete_signing_keys(&strings(&["k1", "early", "unknown"]))
        .await
        .unwrap();
    assert_eq!(store.signing_keys().await.unwrap(), vec![k2, k3]);
    store.delete_signing_keys(&[]).await.unwrap();
    assert_eq!(store.signing_keys().await.unwrap().len(), 2);
}

fn admin_role() -> Role {
    role("admin", &["auth:admin"])
}

async fn the_first_user_is_created_once(store: &impl IdentityStore) {
    // An existing role of that name keeps its permissions and gains the admin's.
    store
        .create_role(&role("admin", &["reports:read"]), &audit("role.created"))
        .await
        .unwrap();
    let first = store
        .create_first_user(
            &new_user("root", None, &[]),
            &admin_role(),
            &audit("user.bootstrapped"),
        )
        .await
        .unwrap()
        .expect("no user yet: created");
    assert_eq!(first.roles, strings(&["admin"]));
    assert_eq!(first.permissions, strings(&["auth:admin", "reports:read"]));
    let again = store
        .create_first_user(
            &new_user("root2", None, &[]),
            &admin_role(),
            &audit("user.bootstrapped"),
        )
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(store.count_users().await.unwrap(), 1);
    let event = &recent(store, 1).await.unwrap()[0];
    assert_eq!(
        (event.kind.as_str(), event.user_id),
        ("user.bootstrapped", Some(first.id))
    );
}

/// Three replicas bootstrapping at once, each with its own pool: one admin.
async fn first_user_created_once_by_concurrent_replicas(replicas: [Database; 3]) {
    let [a, b, c] = &replicas;
    // Connected beforehand, so that the three calls really do overlap.
    for db in &replicas {
        db.ping().await.unwrap();
    }
    let bootstrap = |db: &Database, name: &str| {
        let user = new_user(name, None, &[]);
        let db = db.clone();
        async move {
            db.create_first_user(&user, &admin_role(), &audit("user.bootstrapped"))
                .await
                .unwrap()
        }
    };
    let (ra, rb, rc) = tokio::join!(
        bootstrap(a, "admin-a"),
        bootstrap(b, "admin-b"),
        bootstrap(c, "admin-c")
    );
    let created: Vec<_> = [ra, rb, rc].into_iter().flatten().collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(a.count_users().await.unwrap(), 1);
    assert_eq!(created[0].permissions, strings(&["auth:admin"]));
    for db in &replicas {
        db.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn postgres_first_user_created_once_by_concurrent_replicas() {
    let url = kit::fresh_database().await;
    let replicas = [
        postgres_at(&url).await,
        postgres_at(&url).await,
        postgres_at(&url).await,
    ];
    replicas[0].migrate().await.unwrap();
    first_user_created_once_by_concurrent_replicas(replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sqlite_first_user_created_once_by_concurrent_pools() {
    let dir = tempfile::tempdir().unwrap();
    let open = || connect(kit::embedded_config(dir.path()));
    let replicas = [open(), open(), open()];
    replicas[0].migrate().await.unwrap();
    first_user_created_once_by_concurrent_replicas(replicas).await;
}

/// A change that would take the service from some administrators to none is
/// refused, whichever way it goes; with none to begin with, nothing is refused.
async fn the_last_administrator_stays(store: &impl IdentityStore) {
    let plain = store
        .create_user(&new_user("pat", None, &[]), &audit("user.created"))
        .await
        .unwrap();
    // No administrator yet: nothing to protect.
    store
        .update_user(
            plain.id,
            &UserUpdate {
                disabled: Some(true),
                ..Default::default()
            },
            &audit("user.updated"),
        )
        .await
        .unwrap();
    store
        .create_role(&role("admin", &["auth:admin"]), &audit("role.created"))
        .await
        .unwrap();
    let root = store
        .create_user(&new_user("root", None, &["admin"]), &audit("user.created"))
        .await
        .unwrap();
    let last_admin = |r: Result<_, StoreError>| {
        assert!(matches!(r, Err(StoreError::LastAdmin)), "{:?}", r.err());
    };
    last_admin(
        store
            .update_user(
                root.id,
                &UserUpdate {
                    disabled: Some(true),
                    ..Default::default()
                },
                &audit("user.updated"),
            )
            .await
            .map(|_| ()),
    );
    last_admin(
        store
            .update_user(
                root.id,
                &UserUpdate {
                    roles: Some(Vec::new()),
                    ..Default::default()
                },
                &audit("user.updated"),
            )
            .await
            .map(|_| ()),
    );
    last_admin(store.delete_user(root.id, &audit("user.deleted")).await);
    last_admin(
        store
            .update_role(
                "admin",
                &RoleUpdate {
                    description: None,
                    permissions: Some(strings(&["docs:read"])),
                },
                &audit("role.updated"),
            )
            .await
            .map(|_| ()),
    );
    last_admin(
        store
            .delete_role("admin", &audit("role.deleted"))
            .await
            .map(|_| ()),
    );
    // Nothing of the refused changes stuck, their audit events included.
    let root_now = store.get_user(root.id).await.unwrap().unwrap();
    assert_eq!(root_now, root);
    assert!(recent(store, 100)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != "user.deleted" && e.kind != "role.deleted"));
    // Changes that keep an administrator go through.
    store
        .update_user(
            root.id,
            &UserUpdate {
                email: Some(Some("root@example.com".into())),
                ..Default::default()
            },
            &audit("user.updated"),
        )
        .await
        .unwrap();
    let deputy = store
        .create_user(
            &new_user("deputy", None, &["admin"]),
            &audit("user.created"),
        )
        .await
        .unwrap();
    store
        .update_user(
            root.id,
            &UserUpdate {
                disabled: Some(true),
                ..Default::default()
            },
            &audit("user.updated"),
        )
        .await
        .unwrap();
    last_admin(store.delete_user(deputy.id, &audit("user.deleted")).await);
}

async fn authorization_versions_rise_with_every_change_of_privilege(store: &impl IdentityStore) {
    store
        .create_role(&role("viewer", &["docs:read"]), &audit("role.created"))
        .await
        .unwrap();
    let user = store
        .create_user(&new_user("quinn", None, &[]), &audit("user.created"))
        .await
        .unwrap();
    assert_eq!(user.authz_version, 0);
    let update = |update: UserUpdate| async move {
        store
            .update_user(user.id, &update, &audit("user.updated"))
            .await
            .unwrap()
            .authz_version
    };
    let email = || UserUpdate {
        email: Some(Some("quinn@example.com".into())),
        ..Default::default()
    };
    let roles = |r: &[&str]| UserUpdate {
        roles: Some(strings(r)),
        ..Default::default()
    };
    let disabled = |d| UserUpdate {
        disabled: Some(d),
        ..Default::default()
    };
    assert_eq!(update(email()).await, 0, "an email is no privilege");
    assert_eq!(update(roles(&["viewer"])).await, 1);
    assert_eq!(update(roles(&["viewer"])).await, 1, "the same roles again");
    assert_eq!(update(disabled(false)).await, 1, "not a change");
    assert_eq!(update(disabled(true)).await, 2);
    assert_eq!(
        update(UserUpdate {
            password_hash: Some(HASH.into()),
            ..Default::default()
        })
        .await,
        3,
        "even the same hash: the password was set"
    );
    let credentials = store.find_credentials("QUINN").await.unwrap().unwrap();
    assert_eq!(credentials.user.authz_version, 3);
}

async fn audit_events_filter_page_and_prune(store: &impl IdentityStore) {
    let alice = uuid::Uuid::new_v4();
    let events = [
        AuditEvent::new("login", "failure").user(alice, "alice"),
        AuditEvent::new("login", "success").user(alice, "alice"),
        AuditEvent::new("login", "failure").username("ghost"),
        AuditEvent::new("logout", "success").user(alice, "alice"),
        AuditEvent::new("login", "failure").user(alice, "alice"),
    ];
    for event in &events {
        store.record_audit(event).await.unwrap();
    }
    let query = |q: AuditQuery| async move { store.audit_events(&q).await.unwrap() };
    let kinds = |events: &[StoredAuditEvent]| {
        events
            .iter()
            .map(|e| format!("{}:{}", e.kind, e.outcome))
            .collect::<Vec<_>>()
    };
    let all = query(AuditQuery {
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(
        kinds(&all),
        [
            "login:failure",
            "logout:success",
            "login:failure",
            "login:success",
            "login:failure"
        ]
    );
    let alice_failures = query(AuditQuery {
        user_id: Some(alice),
        kind: Some("login".into()),
        outcome: Some("failure".into()),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(alice_failures.len(), 2);
    // A page after the newest event (the cursor is an id, exclusive).
    let page = query(AuditQuery {
        before_id: Some(all[0].id),
        limit: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(kinds(&page), ["logout:success", "login:failure"]);
    let now = Utc::now();
    let later = query(AuditQuery {
        since: Some(now + chrono::Duration::minutes(1)),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert!(later.is_empty());
    let earlier = query(AuditQuery {
        until: Some(now - chrono::Duration::minutes(1)),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert!(earlier.is_empty());

    // Pruning: the oldest first, in batches, nothing newer than the cut.
    assert_eq!(
        store
            .prune_audit(now - chrono::Duration::minutes(1), 2)
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        store
            .prune_audit(now + chrono::Duration::minutes(1), 2)
            .await
            .unwrap(),
        Some(2)
    );
    let left = query(AuditQuery {
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(left.len(), 3);
    assert_eq!(left.last().map(|e| e.id), Some(all[2].id));
}
