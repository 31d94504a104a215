//! Bearer-token authentication on the gRPC API: one token for inference, another for
//! control (which may also call inference). Health and reflection stay open so probes
//! and grpcurl's `list` work. Tokens never appear in logs or `Debug` output.

use std::fmt;

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// A secret string: compared in constant time, redacted when printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        // Length is not secret; the bytes are compared without an early exit.
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `[auth]` section: no tokens, no authentication (the loopback sidecar default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSettings {
    pub inference_token: Option<Secret>,
    pub control_token: Option<Secret>,
}

/// Which API a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Control,
}

fn bearer(meta: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = meta.get("authorization") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization: not ASCII"))?;
    text.strip_prefix("Bearer ")
        .map(|t| Some(t.trim()))
        .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer <token>\""))
}

impl AuthSettings {
    /// Admits or refuses a request for `scope`.
    pub fn check(&self, scope: Scope, meta: &MetadataMap) -> Result<(), Status> {
        let (inference, control) = (&self.inference_token, &self.control_token);
        let required = match scope {
            Scope::Inference => inference.is_some() || control.is_some(),
            Scope::Control => control.is_some(),
        };
        if !required {
            return Ok(());
        }
        let Some(token) = bearer(meta)? else {
            return Err(Status::unauthenticated(
                "this server requires `authorization: Bearer <token>` metadata",
            ));
        };
        let is_control = control.as_ref().is_some_and(|c| c.matches(token));
        let is_inference = inference.as_ref().is_some_and(|i| i.matches(token));
        match scope {
            Scope::Inference if is_control || is_inference => Ok(()),
            Scope::Control if is_control => Ok(()),
            Scope::Control if is_inference => Err(Status::permission_denied(
                "the inference token does not grant control RPCs",
            )),
            _ => Err(Status::unauthenticated("unknown token")),
        }
    }

    /// A tonic interceptor for `scope`.
    pub fn interceptor(
        &self,
        scope: Scope,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        let auth = self.clone();
        move |request: Request<()>| {
            auth.check(scope, request.metadata())?;
            Ok(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    }

    #[test]
    fn scopes_and_codes() {
        let auth = AuthSettings {
            inference_token: Some(Secret::new("inf".into())),
            control_token: Some(Secret::new("ctl".into())),
        };
        let code = |scope, token| auth.check(scope, &meta(token)).err().map(|s| s.code());
        assert_eq!(code(Scope::Inference, Some("inf")), None);
        assert_eq!(code(Scope::Inference, Some("ctl")), None);
        assert_eq!(code(Scope::Control, Some("ctl")), None);
        assert_eq!(
            code(Scope::Control, Some("inf")),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(Scope::Inference, Some("nope")),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(Scope::Inference, None),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            AuthSettings::default()
                .check(Scope::Control, &meta(None))
                .ok(),
            Some(())
        );
        assert_eq!(format!("{auth:?}").matches("redacted").count(), 2);
        assert!(!format!("{auth:?}").contains("inf\""));
    }
}
