//! The built-in status page on the HTTP/JSON listener (`http://<http_listen>/`): pools with
//! their VMs by state, leases with holder and age, waiters, the last hour's acquire latency and
//! reset duration, the daemon's and the store's health.
//!
//! The page is static, embedded in the binary and served without a token: an HTML skeleton, a
//! stylesheet and a script (no build step, no CDN, no external font). The script reads the
//! JSON API (`GET /v1/health`, `/v1/pools`, `/v1/leases`, `/v1/history`) every few seconds with
//! the caller's token, so it shows exactly what that token may see; it takes the token from the
//! URL fragment (`/#token=...`, then removed from the address bar) or asks for it when the API
//! answers 401, keeps it in the tab's `sessionStorage` and sends it as `Authorization: Bearer`
//! (no cookies). A strict Content-Security-Policy allows only this origin's own script, styles
//! and requests, and Trusted Types forbid putting strings into the page as markup.
//!
//! [`asset`] is a plain function of the path, so any router can mount it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The page's Content-Security-Policy: this origin only, no inline script or style, no
/// framing, no markup from strings (Trusted Types).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
     require-trusted-types-for 'script'; trusted-types 'none'";

/// Headers every asset is served with, besides its `Content-Type`.
pub const HEADERS: [(&str, &str); 5] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    // Revalidated on each load, so a new mpool's page is picked up at once.
    ("cache-control", "no-cache"),
];

/// One embedded file of the page, as an HTTP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    /// The HTTP status (200).
    pub status: StatusCode,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The page's files by path: `(path, content type, bytes)`.
const FILES: [(&str, &str, &[u8]); 4] = [
    ("/", "text/html; charset=utf-8", include_bytes!("../assets/index.html")),
    ("/assets/status-page.js", "text/javascript; charset=utf-8", include_bytes!("../assets/status-page.js")),
    ("/assets/status-page.css", "text/css; charset=utf-8", include_bytes!("../assets/status-page.css")),
    ("/assets/favicon.svg", "image/svg+xml", include_bytes!("../assets/favicon.svg")),
];

/// The answer to `GET path` when `path` is one of the page's files (no token needed); `None`
/// for every other path (the API's routes).
pub fn asset(path: &str) -> Option<Asset> {
    FILES.iter().find(|(p, _, _)| *p == path).map(|(_, content_type, body)| Asset {
        status: StatusCode::OK,
        content_type,
        body,
    })
}

impl Asset {
    /// The answer with its `Content-Type` and [`HEADERS`].
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from_static(self.body)));
        *r.status_mut() = self.status;
        let headers = r.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        for (name, value) in HEADERS {
            headers.insert(name, HeaderValue::from_static(value));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        std::str::from_utf8(asset(path).expect(path).body).expect("UTF-8")
    }

    #[test]
    fn the_page_and_its_files_are_served_with_the_policy() {
        for (path, _, _) in FILES {
            let r = asset(path).expect(path).response();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-security-policy"], CONTENT_SECURITY_POLICY);
            assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        }
        assert_eq!(asset("/").unwrap().content_type, "text/html; charset=utf-8");
        for other in ["/v1/pools", "/healthz", "/index.html", "/assets/", "/assets/../assets/status-page.js", ""] {
            assert_eq!(asset(other), None, "{other}");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"), "no unsafe-inline or unsafe-eval");
    }

    #[test]
    fn the_html_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() {
        let html = text("/");
        assert_eq!(html.matches("<script").count(), 1, "one script element");
        assert!(html.contains("<script src=\"assets/status-page.js\" defer></script>"));
        assert!(!html.contains("<style") && !html.contains(" style="), "styles come from the stylesheet");
        let handler = html.split(" on").skip(1).any(|rest| {
            let name = rest.chars().take_while(char::is_ascii_alphabetic).count();
            name > 0 && rest[name..].starts_with('=')
        });
        assert!(!handler, "no inline event handlers");
        for (path, _, _) in FILES {
            let t = text(path).replace("http://www.w3.org/2000/svg", "");
            assert!(
                !t.contains("http://") && !t.contains("https://") && !t.contains("//cdn"),
                "{path} fetches elsewhere"
            );
            assert!(!t.contains("@import") && !t.contains("url("), "{path} loads fonts or images");
        }
    }

    #[test]
    fn the_script_writes_data_as_text_only() {
        let js = text("/assets/status-page.js");
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
            assert!(!js.contains(sink), "the script uses {sink}");
        }
        assert!(js.contains("sessionStorage") && js.contains("'Bearer '"), "token in sessionStorage, sent as Bearer");
        assert!(js.contains("replaceState"), "the fragment is taken out of the address bar");
    }
}
