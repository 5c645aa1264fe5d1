//! Membership from a Kubernetes headless Service's EndpointSlices.
//!
//! Not built yet (issue 16): the seam the cache's startup calls.

use super::{Discovery, Membership};

/// The membership `me` sees through `discovery`, kept current in the
/// background. Errors: discovery is not available in this build.
pub async fn membership(me: &str, discovery: &Discovery) -> anyhow::Result<Membership> {
    anyhow::bail!(
        "member {me}: discovery through Service {:?} is not available in this build",
        discovery.service
    )
}
