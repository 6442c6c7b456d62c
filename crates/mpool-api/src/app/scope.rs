//! What a caller may touch. Use cases take the caller's [`Principal`] explicitly: `None` is a
//! caller on a listener without authentication (the Unix socket, whose file mode is its access
//! control), who may do everything; a token's principal may use the pools it lists and, unless
//! it is an admin, only the leases it acquired.

use super::error::AppError;
use crate::auth::Principal;

/// The owner leases are checked against: `None` for admins and unauthenticated listeners
/// (they may touch any lease).
pub fn owner(p: Option<&Principal>) -> Option<String> {
    p.and_then(Principal::owner)
}

/// The owner recorded on a lease the caller acquires: the token's name, if any.
pub fn acquirer(p: Option<&Principal>) -> Option<String> {
    p.map(|p| p.name.clone())
}

/// Whether the caller may see and use `pool`.
pub fn may_use(p: Option<&Principal>, pool: &str) -> bool {
    p.is_none_or(|p| p.may_use(pool))
}

/// Refuses a pool the caller's token does not list, naming the fix.
pub fn check_pool(p: Option<&Principal>, pool: &str) -> Result<(), AppError> {
    match p {
        Some(p) if !p.may_use(pool) => Err(AppError::permission_denied(format!(
            "token {:?} may not use pool {pool:?}; use a token whose `pools` in the server's tokens file include it",
            p.name
        ))),
        _ => Ok(()),
    }
}

/// Refuses a token that is not an admin's (`doing` says what it tried), naming the fix.
pub fn check_admin(p: Option<&Principal>, doing: &str) -> Result<(), AppError> {
    match p {
        Some(p) if !p.admin => Err(AppError::permission_denied(format!(
            "token {:?} may not {doing}: only admins may; use a token with `admin = true` in the server's tokens \
             file, mTLS, or the Unix socket",
            p.name
        ))),
        _ => Ok(()),
    }
}
