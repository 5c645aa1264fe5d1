use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::events::Reporter;
use regmirror_operator::controller;
use regmirror_operator::installation::{self, Installation};
use regmirror_operator::leader::{self, LeaseConfig};
use regmirror_operator::metrics::{self, Metrics};
use regmirror_operator::resources::Settings;
use tokio_util::sync::CancellationToken;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// After SIGTERM: how long running reconciles may finish, and separately how
/// long releasing the lease may take, before the process exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "regmirror-operator",
    version,
    about = "Kubernetes operator for regmirror: RegistryMirror resources become a running pull-through cache and node configuration",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run(RunArgs),
    /// Print the RegistryMirror CustomResourceDefinition as YAML.
    Crd {
        /// Print the RegistryMirrorNode CRD (the node agents' reports) instead.
        #[arg(long)]
        node: bool,
    },
    /// Before uninstalling (the chart's pre-delete hook): delete every
    /// RegistryMirror this installation manages and wait until their node
    /// configuration is removed; fails, naming what remains, after --timeout.
    Uninstall(UninstallArgs),
    /// Node agent: reconciles this node's containerd hosts.toml files for every
    /// RegistryMirror and reports to its RegistryMirrorNode (run by the chart's
    /// DaemonSet, one pod per node).
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// This node's name (downward API spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's IP, where containerd reaches the caches' NodePorts (status.hostIP).
    #[arg(long, env = "NODE_IP")]
    node_ip: String,
    /// Where this process sees the node's `/` (the pod mounts each allowed
    /// directory under it); `/` when run directly on a node.
    #[arg(long, env = "REGMIRROR_HOST_ROOT", default_value = "/host")]
    host_root: std::path::PathBuf,
    /// A node directory the agent may write (a mirror's containerdConfigDir)
    /// and read (its containerdConfigFile) in; repeatable. Set by the
    /// installer (chart value agent.hostDirs), never by a RegistryMirror.
    #[arg(
        long = "allowed-dir",
        env = "REGMIRROR_ALLOWED_DIRS",
        value_delimiter = ',',
        default_value = "/etc/containerd"
    )]
    allowed_dirs: Vec<String>,
    /// Re-check the files this often without a change (e.g. 30s).
    #[arg(long, env = "REGMIRROR_RESYNC", default_value = "30s")]
    resync: humantime::Duration,
    /// Rewrite an unchanged report this often (its lastUpdate heartbeat).
    #[arg(long, env = "REGMIRROR_HEARTBEAT", default_value = "5m")]
    heartbeat: humantime::Duration,
    /// Address serving /healthz and /readyz (ready once this node is
    /// reconciled and reported); none when unset.
    #[arg(long, env = "REGMIRROR_PROBE_ADDR")]
    probe_addr: Option<SocketAddr>,
    /// This agent's installation, NAMESPACE/LEASE (the chart passes its
    /// release namespace and leader Lease): while another installation
    /// holds the claim on the RegistryMirrors, this agent touches nothing.
    #[arg(long, env = "REGMIRROR_INSTALLATION")]
    installation: Option<String>,
}

#[derive(Debug, Args)]
struct UninstallArgs {
    /// The installation's namespace (the operator's --namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "regmirror-system")]
    namespace: String,
    /// The installation's leader Lease (the operator's --lease-name).
    #[arg(
        long,
        env = "REGMIRROR_LEASE_NAME",
        default_value = "regmirror-operator"
    )]
    lease_name: String,
    /// Whether the installation's operator runs with leader election (the
    /// operator's --leader-election): then nothing is deleted unless its
    /// leader Lease is held (a running operator removes the node configuration).
    #[arg(long, env = "REGMIRROR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// How long to wait for the mirrors to be removed (e.g. 4m).
    #[arg(long, default_value = "4m")]
    timeout: humantime::Duration,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Namespace for the caches, node agents and the leader lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "regmirror-system")]
    namespace: String,
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, env = "REGMIRROR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Hold a Lease before reconciling, so several replicas are safe.
    #[arg(long, env = "REGMIRROR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "REGMIRROR_LEASE_NAME",
        default_value = "regmirror-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease and in Events [default: hostname].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Cache image for mirrors that do not set spec.cache.image.
    #[arg(long, env = "REGMIRROR_CACHE_IMAGE", default_value_t = format!("ghcr.io/regmirror/regmirror-cache:{VERSION}"))]
    cache_image: String,
    /// The node agent image the installer runs (the chart's agent.image); a mirror whose spec.nodes.agentImage names another is refused.
    #[arg(long, env = "REGMIRROR_AGENT_IMAGE", default_value_t = format!("ghcr.io/regmirror/regmirror-operator:{VERSION}"))]
    agent_image: String,
    /// Node directories the node agents may use, comma-separated (the chart's agent.hostDirs, which its agent DaemonSet mounts); a mirror whose containerd paths are outside them is refused.
    #[arg(
        long,
        env = "REGMIRROR_AGENT_HOST_DIRS",
        value_delimiter = ',',
        default_value = "/etc/containerd"
    )]
    agent_host_dirs: Vec<String>,
    /// The node agent DaemonSet the installer runs in --namespace (the chart's <release>-agent), read to say why nodes have not reported.
    #[arg(
        long,
        env = "REGMIRROR_AGENT_DAEMONSET",
        default_value = "regmirror-agent"
    )]
    agent_daemonset: String,
    /// Where pods reach the API server, HOST:PORT, when not at the kubernetes Service's cluster IP (the chart's apiServer.host/port): given to the cache pods as KUBERNETES_SERVICE_HOST/PORT.
    #[arg(long, env = "REGMIRROR_KUBERNETES_SERVICE")]
    kubernetes_service: Option<regmirror_operator::resources::HostPort>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd { node }) => {
            if node {
                print!("{}", regmirror_operator::node_report::crd_yaml());
            } else {
                print!("{}", regmirror_operator::crd::crd_yaml());
            }
            Ok(())
        }
        Some(Command::Agent(args)) => agent(args).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Uninstall(args)) => uninstall(args).await,
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(None);
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| format!("regmirror-operator-{}", std::process::id()))
    });
    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    serve(args.metrics_addr, &metrics, &shutdown).await?;
    {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
        });
    }

    let settings = Settings {
        namespace: args.namespace.clone(),
        cache_image: args.cache_image,
        agent_image: args.agent_image,
        agent_host_dirs: args.agent_host_dirs,
        agent_daemon_set: args.agent_daemonset,
        kubernetes_service: args.kubernetes_service,
    };
    let reporter = Reporter {
        controller: "regmirror-operator".into(),
        instance: Some(identity.clone()),
    };
    // Not ready (and nothing to lead) until RegistryMirrors are served: a
    // missing CRD is logged at error level and fails /readyz, and the CRD is
    // picked up when it is installed. SIGTERM ends the wait at once.
    if !controller::wait_for_crd(&client, &metrics, &shutdown).await {
        return Ok(());
    }
    // Standing by for the lease is a healthy state.
    metrics.ready.store(true, Ordering::Relaxed);

    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.namespace);
    let lease = LeaseConfig::new(args.lease_name, identity);
    if args.leader_election {
        tokio::select! {
            _ = leader::acquire(&leases, &lease) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        metrics.leader.set(1);
    }
    // One installation manages the cluster's RegistryMirrors (issue 18):
    // wait while another, alive, holds the claim, keeping our lease meanwhile.
    let installation = Installation {
        namespace: args.namespace.clone(),
        lease: lease.name.clone(),
    };
    let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter.clone());
    let keep_lease = async {
        if args.leader_election {
            leader::hold(&leases, &lease).await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        () = installation::claim(&client, &installation, &metrics, &recorder) => {}
        _ = keep_lease => {
            metrics.leader.set(0);
            anyhow::bail!("lost the leader lease");
        }
        _ = shutdown.cancelled() => {
            if args.leader_election {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, leader::release(&leases, &lease)).await;
            }
            return Ok(());
        }
    }
    tracing::info!(namespace = %settings.namespace, "starting the RegistryMirror controller");
    let controller = controller::run(
        client.clone(),
        settings,
        metrics.clone(),
        reporter,
        shutdown.clone().cancelled_owned(),
    );
    let lost = async {
        if args.leader_election {
            leader::hold(&leases, &lease).await
        } else {
            std::future::pending().await
        }
    };
    // The controller's graceful shutdown waits for its watches' first list;
    // when the API server went away that never comes: exit after a grace.
    let stuck = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = controller => {}
        by = installation::keep(&client, &installation) => {
            anyhow::bail!("another regmirror installation ({by}) manages the RegistryMirrors now: stopping");
        }
        _ = stuck => tracing::warn!(grace = ?SHUTDOWN_GRACE, "the controller did not stop within the grace period: exiting"),
        _ = lost => {
            metrics.leader.set(0);
            // Another replica may be reconciling already: stop at once.
            anyhow::bail!("lost the leader lease");
        }
    }
    if args.leader_election
        && tokio::time::timeout(SHUTDOWN_GRACE, leader::release(&leases, &lease))
            .await
            .is_err()
    {
        tracing::warn!("cannot release the leader lease: the API server did not answer");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    init_tracing(Some("kube_client::client::builder=off"));
    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
    let me = Installation {
        namespace: args.namespace,
        lease: args.lease_name,
    };
    regmirror_operator::uninstall::run(&client, &me, args.leader_election, args.timeout.into())
        .await
        .map(drop)
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    // The agent logs each failed API request itself, rate-limited
    // (agent/mod.rs); kube's client would log every one again at ERROR,
    // and its watcher every failed 403 list at WARN.
    init_tracing(Some(
        "kube_client::client::builder=off,kube_runtime::watcher=off",
    ));
    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
    let shutdown = CancellationToken::new();
    {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
        });
    }
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.probe_addr {
        serve(addr, &metrics, &shutdown).await?;
    }
    let cfg = regmirror_operator::agent::AgentConfig {
        node_name: args.node_name,
        node_ip: args.node_ip,
        host_root: args.host_root,
        allowed_dirs: args.allowed_dirs,
        resync: args.resync.into(),
        heartbeat: args.heartbeat.into(),
        installation: match args.installation.as_deref() {
            None => None,
            Some(text) => Some(
                Installation::parse(text)
                    .with_context(|| format!("--installation {text:?} must be NAMESPACE/LEASE"))?,
            ),
        },
    };
    regmirror_operator::agent::run(client, cfg, &metrics.ready, shutdown).await
}

/// Serves /metrics, /healthz and /readyz from `metrics` on `addr` until
/// `shutdown`; errors when `addr` cannot be bound.
async fn serve(
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let app = metrics::app(metrics.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(())
}

/// Logging to stdout at `$REGMIRROR_LOG` (default `info`); `quiet`, a filter
/// directive, is added unless `$REGMIRROR_LOG` names kube_client itself.
fn init_tracing(quiet: Option<&str>) {
    let spec = std::env::var("REGMIRROR_LOG").unwrap_or_else(|_| "info".to_owned());
    let spec = match quiet {
        Some(q) if !spec.contains("kube_client") => format!("{spec},{q}"),
        _ => spec,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in a pod's log they are noise (issue 18).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
