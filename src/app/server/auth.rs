//! API-key authentication: `Authorization: Bearer KEY`, compared in constant time. The
//! key never appears in logs or `Debug` output.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// The name of the security scheme in the OpenAPI document.
pub const SCHEME_NAME: &str = "bearerAuth";

/// The server's API key. `Debug` and `Display` print `<redacted>`; there is no `==`, only
/// the constant-time [`ApiKey::matches`].
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Whether `given` is the key, in time that depends only on the key's length.
    pub fn matches(&self, given: &[u8]) -> bool {
        let key = self.0.as_bytes();
        // Compare every byte of the key whatever `given` is, so that neither a prefix
        // match nor `given`'s length shortens the work.
        let mut equal = subtle::Choice::from(1u8);
        for (i, k) in key.iter().enumerate() {
            equal &= k.ct_eq(given.get(i).unwrap_or(&0));
        }
        equal &= (key.len() as u64).ct_eq(&(given.len() as u64));
        equal.into()
    }
}

impl FromStr for ApiKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("the API key must not be empty".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the API key must not contain whitespace".into());
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Checks a request's `Authorization` header against `key`.
pub fn check(key: Option<&ApiKey>, header: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = key else {
        return Ok(());
    };
    let Some(header) = header else {
        return Err(ApiError::unauthorized(
            "missing_api_key",
            "you didn't provide an API key: send `Authorization: Bearer YOUR_KEY`",
        ));
    };
    let token = header
        .trim()
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "invalid_api_key",
                "malformed Authorization header: expected `Bearer YOUR_KEY`",
            )
        })?;
    if key.matches(token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "invalid_api_key",
            "incorrect API key provided",
        ))
    }
}

/// Extractor that admits a request when the server has no key or the request carries
/// it; documented in the schema as HTTP bearer authentication.
#[derive(Debug, Clone, Copy)]
pub struct Authorized;

impl<'a> ApiExtractor<'a> for Authorized {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        registry.create_security_scheme(
            SCHEME_NAME,
            MetaSecurityScheme {
                ty: "http",
                description: Some(
                    "`Authorization: Bearer KEY`, needed on every route but `/health`, \
                     `/docs` and `/openapi.json` when the server was started with \
                     `--api-key` or `HYPERGEN_API_KEY`.",
                ),
                name: None,
                key_in: None,
                scheme: Some("bearer"),
                bearer_format: None,
                flows: None,
                openid_connect_url: None,
            },
        );
    }

    fn security_schemes() -> Vec<&'static str> {
        vec![SCHEME_NAME]
    }

    async fn from_request(
        request: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let state = request
            .data::<Arc<AppState>>()
            .ok_or_else(|| ApiError::internal("server state missing"))?;
        check(
            state.config.api_key.as_ref(),
            request.header("authorization"),
        )?;
        Ok(Authorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly() {
        let key: ApiKey = "sk-secret".parse().expect("key");
        assert!(key.matches(b"sk-secret"));
        for other in [
            &b""[..],
            b"sk-secre",
            b"sk-secret2",
            b"sk-secreT",
            b"xk-secret",
        ] {
            assert!(!key.matches(other), "{other:?}");
        }
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert!("".parse::<ApiKey>().is_err());
    }

    #[test]
    fn headers_are_checked() {
        let key: ApiKey = "k1".parse().expect("key");
        assert!(check(None, None).is_ok());
        assert!(check(Some(&key), Some("Bearer k1")).is_ok());
        assert!(check(Some(&key), Some("bearer  k1 ")).is_ok());
        let code = |h| check(Some(&key), h).expect_err("refused").code;
        assert_eq!(code(None), "missing_api_key");
        assert_eq!(code(Some("k1")), "invalid_api_key");
        assert_eq!(code(Some("Basic k1")), "invalid_api_key");
        assert_eq!(code(Some("Bearer k2")), "invalid_api_key");
        assert_eq!(code(Some("Bearer ")), "invalid_api_key");
    }
}
