//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager from the envtest binaries in `KUBEBUILDER_ASSETS`, on loopback.
//!
//! EKS's authentication is reproduced as EKS does it: the API server asks a token webhook
//! served by the rig ([`authn`]) about every `k8s-aws-v1.` token, and `deploy/rbac.yaml` and
//! `cluster-agent/deploy/rbac.yaml` are applied, so the real RBAC authorizer judges nth's
//! requests. One control plane serves a whole test binary; tests take turns through
//! [`ControlPlane::lease`], which wipes the cluster, and seed it through [`RealCluster`].

mod authn;
mod cluster;
mod kubelet;

pub use authn::{EKS_GROUP, EKS_USERNAME};
pub use cluster::{Lease, RealCluster};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::KeyPair;
use serde_json::{json, Value};

use crate::tls::TestPki;
use authn::Authn;

/// The user of the static admin token (cluster-admin through `system:masters`).
const ADMIN_USER: &str = "nth-envtest-admin";
/// The agent's ServiceAccount as the API server names it.
const AGENT_USER: &str = "system:serviceaccount:kube-system:nth-agent";
/// How long each server may take to become ready on a busy two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Starts `$0 "$@"` and kills it (then removes the run's folder) once the test process's end
/// of stdin closes, which the kernel does however the test process ends, SIGKILL included.
/// The shell itself exits when the server does, so a crash shows as the child's exit.
/// Background jobs of a non-interactive shell get /dev/null as stdin, hence fd 3.
const WATCHDOG: &str = r#"exec 3<&0
"$0" "$@" </dev/null 3<&- &
server=$!
{ cat >/dev/null; kill -9 "$server" 2>/dev/null; rm -rf "$NTH_ENVTEST_DIR"; } <&3 3<&- &
exec 3<&-
wait "$server""#;

static PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// A running control plane, shared by every test of the binary.
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`
    pub url: String,
    pub ca_pem: String,
    /// From the first process started to `/readyz` answering and the RBAC manifests applied.
    pub started_in: Duration,
    /// Data, certificates, kubeconfigs and each server's log (`<server>.log`).
    pub dir: PathBuf,
    ca_der: Vec<u8>,
    agent_token: String,
    /// Outlives every test's own runtime: the webhook, the kube client's connections and
    /// each lease's kubelet stand-in run here.
    runtime: tokio::runtime::Runtime,
    /// Built on `runtime`, so its connections do not die with the runtime of the test that
    /// happened to use it first.
    admin: kube::Client,
    authn: Arc<Authn>,
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The last lease's kubelet stand-in, awaited by the next lease before it wipes.
    stand_in: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Namespaces created so far (with their `default` ServiceAccount): never deleted.
    namespaces: Mutex<std::collections::BTreeSet<String>>,
    /// Holding their stdin keeps the servers alive; see [`WATCHDOG`].
    servers: Vec<Server>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the tokens: they are credentials.
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Server {
    name: &'static str,
    child: Child,
    _stdin: ChildStdin,
    log: PathBuf,
}

impl Server {
    fn start(
        dir: &Path,
        assets: &Path,
        name: &'static str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(assets.join(name))
            .args(args)
            .env("NTH_ENVTEST_DIR", dir)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("the watchdog's stdin")?;
        Ok(Self {
            name,
            child,
            _stdin: stdin,
            log,
        })
    }

    /// Why the server is not ready yet: its exit, and its log's last lines.
    fn failure(&mut self, waited: &str) -> anyhow::Error {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            _ => "is still running".to_owned(),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        // The folder goes with the failed plane's watchdogs, so the lines travel in the error.
        anyhow::anyhow!(
            "{} {waited} and {state}; the last lines of its log:\n{tail}",
            self.name
        )
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn memory_kib(&self) -> Option<u64> {
        // The watchdog shell's children are the watchdog subshell and the server; the
        // server is the one whose command line is the binary.
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                .ok()?;
        children.split_whitespace().find_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let name = status.lines().next()?.split_whitespace().nth(1)?;
            if !self.name.starts_with(name) {
                return None;
            }
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
    }
}

impl ControlPlane {
    /// The binary's control plane, started on first use (about 5 s). `None` when
    /// `KUBEBUILDER_ASSETS` is unset; `Err`, the same for every caller, when it is set but
    /// the plane did not start. Blocks, so it may be called from any runtime or none.
    pub fn shared() -> anyhow::Result<Option<&'static ControlPlane>> {
        let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let plane = PLANE.get_or_init(|| {
            let assets = PathBuf::from(assets);
            // A thread of its own: the runtime built there can be blocked on (and dropped on
            // failure), which the caller's runtime thread forbids.
            std::thread::spawn(move || Self::start(&assets))
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the start-up thread panicked")))
                .map_err(|e| format!("{e:#}"))
        });
        match plane {
            Ok(plane) => Ok(Some(plane)),
            Err(why) => {
                bail!("KUBEBUILDER_ASSETS is set but the control plane did not start: {why}")
            }
        }
    }

    fn start(assets: &Path) -> anyhow::Result<Self> {
        let began = Instant::now();
        for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if !assets.join(binary).is_file() {
                bail!("{} has no {binary}", assets.display());
            }
        }
        remove_stale_runs();
        let dir = std::env::temp_dir().join(format!("nth-envtest-{}", std::process::id()));
        let _fresh = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki::write(&dir)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nth-envtest")
            .enable_all()
            .build()
            .context("building the control plane's runtime")?;
        let authn = Arc::new(Authn::new(crate::sandbox::CLUSTER));
        let webhook_port = runtime.block_on(authn::serve(Arc::clone(&authn)))?;

        // Unguessable enough for a loopback server that lives as long as one test binary.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            ^ u128::from(std::process::id());
        let admin_token = format!("nth-envtest-admin-{stamp:x}");
        let agent_token = format!("nth-envtest-agent-{stamp:x}");
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},{ADMIN_USER},admin,\"system:masters\"\n\
                 {agent_token},{AGENT_USER},nth-agent,\"system:serviceaccounts,system:serviceaccounts:kube-system,system:authenticated\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("authn-webhook.json"),
            json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "authn",
                "clusters": [{"name": "authn", "cluster": {
                    "server": format!("http://127.0.0.1:{webhook_port}/authenticate"),
                }}],
                "users": [{"name": "kube-apiserver", "user": {}}],
                "contexts": [{"name": "authn", "context": {"cluster": "authn", "user": "kube-apiserver"}}],
            })
            .to_string(),
        )?;

        let mut servers = Vec::new();
        let etcd_port = crate::free_port()?;
        let peer_port = crate::free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        servers.push(Server::start(
            &dir,
            assets,
            "etcd",
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=nth={peer_url}"),
                "--name=nth".to_owned(),
                // Durability is worth nothing here and fsyncs are slow on a shared disk.
                "--unsafe-no-fsync".to_owned(),
            ],
        )?);
        wait_until(&mut servers[0], "was not healthy", || {
            etcd_healthy(etcd_port)
        })?;

        let api_port = crate::free_port()?;
        let url = format!("https://127.0.0.1:{api_port}");
        let file = |name: &str| dir.join(name).display().to_string();
        servers.push(Server::start(
            &dir,
            assets,
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".to_owned(),
                "--advertise-address=127.0.0.1".to_owned(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", file("server.crt")),
                format!("--tls-private-key-file={}", file("server.key")),
                format!("--client-ca-file={}", file("ca.crt")),
                format!("--token-auth-file={}", file("tokens.csv")),
                format!(
                    "--authentication-token-webhook-config-file={}",
                    file("authn-webhook.json")
                ),
                "--authentication-token-webhook-version=v1".to_owned(),
                // Every request is judged afresh, so an expired or replaced token is refused
                // at once, as tests of token reuse need.
                "--authentication-token-webhook-cache-ttl=0s".to_owned(),
                "--authorization-mode=Node,RBAC".to_owned(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
                format!("--service-account-key-file={}", file("sa.pub")),
                format!("--service-account-signing-key-file={}", file("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
                "--endpoint-reconciler-type=none".to_owned(),
                "--allow-privileged=true".to_owned(),
            ]
            .into_iter()
            .chain(admission_policy_flags(assets)?)
            .collect::<Vec<_>>(),
        )?);
        let mut admin_config = kube::Config::new(url.parse().context("the API server URL")?);
        admin_config.root_cert = Some(vec![pki.ca_der.clone()]);
        admin_config.auth_info.token = Some(admin_token.clone().into());
        // Tests must see every 429 (PodDisruptionBudget refusals), as nth's own client does.
        admin_config.default_retry = false;
        let admin = {
            let _entered = runtime.enter();
            let inner =
                kube::Client::try_from(admin_config).context("building the admin client")?;
            on_plane_runtime(inner, runtime.handle().clone())
        };
        wait_until(&mut servers[1], "did not answer /readyz", || {
            runtime.block_on(async {
                let request = http::Request::get("/readyz").body(Vec::new());
                match request {
                    Ok(request) => admin.request_text(request).await.is_ok(),
                    Err(_) => false,
                }
            })
        })?;

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin_kubeconfig,
            crate::kubeconfig(&url, &pki.ca_pem, "admin", &admin_token).to_string(),
        )?;
        let kcm_port = crate::free_port()?;
        servers.push(Server::start(
            &dir,
            assets,
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", admin_kubeconfig.display()),
                format!("--authentication-kubeconfig={}", admin_kubeconfig.display()),
                format!("--authorization-kubeconfig={}", admin_kubeconfig.display()),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--secure-port={kcm_port}"),
                // The disruption controller alone: budgets' status is what tests need.
                // No garbage collector (fixtures own pods by owners that do not exist) and no
                // namespace controller (leases empty namespaces instead of deleting them).
                "--controllers=disruption-controller".to_owned(),
                format!("--root-ca-file={}", file("ca.crt")),
                "--leader-elect=false".to_owned(),
            ],
        )?);

        apply_rbac(&admin_kubeconfig, &dir)?;
        if servers[2].exited() {
            return Err(servers[2].failure("stopped"));
        }
        Ok(Self {
            url,
            ca_pem: pki.ca_pem,
            started_in: began.elapsed(),
            dir,
            ca_der: pki.ca_der,
            agent_token,
            runtime,
            admin,
            authn,
            turn: Arc::new(tokio::sync::Mutex::new(())),
            stand_in: Mutex::new(None),
            namespaces: Mutex::new(std::collections::BTreeSet::new()),
            servers,
        })
    }

    /// A cluster-admin client (static token in `system:masters`), without kube's automatic
    /// 429 retry.
    pub fn admin_client(&self) -> kube::Client {
        self.admin.clone()
    }

    /// A client presenting `token` as its bearer token. Call it inside a runtime.
    pub fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse().context("the API server URL")?);
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(token.to_owned().into());
        config.default_retry = false;
        Ok(kube::Client::try_from(config)?)
    }

    /// nth's own EKS client stack (presigned `k8s-aws-v1.` tokens for `cluster` from the test
    /// credentials, no automatic 429 retry), as the Lambda function builds it. Call it inside
    /// a runtime.
    pub fn eks_client(&self, cluster: &str) -> anyhow::Result<kube::Client> {
        crate::eks_client(&self.url, &self.ca_pem, cluster)
    }

    /// A kubeconfig (server, CA, static token) for the agent's ServiceAccount, with the
    /// groups the API server gives a ServiceAccount token.
    pub fn agent_kubeconfig(&self) -> Value {
        crate::kubeconfig(&self.url, &self.ca_pem, "nth-agent", &self.agent_token)
    }

    /// Also accept EKS tokens signed for `cluster` from now on.
    pub fn accept_cluster(&self, cluster: &str) {
        self.authn.accept_cluster(cluster);
    }

    /// The resident memory of each server, in KiB.
    pub fn memory_kib(&self) -> Vec<(&'static str, u64)> {
        self.servers
            .iter()
            .filter_map(|s| Some((s.name, s.memory_kib()?)))
            .collect()
    }

    /// Waits for the other tests' leases, then wipes the cluster for this one.
    pub async fn lease(&'static self) -> anyhow::Result<Lease> {
        Lease::take(self).await
    }

    /// Runs `kubectl` as cluster-admin against this plane. Blocks (RBAC edits and their
    /// restore, which must also run from a `Drop`).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("kubectl")
            .arg(format!(
                "--kubeconfig={}",
                self.dir.join("admin.kubeconfig").display()
            ))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args)
            .output()
            .context("running kubectl (is it on the PATH?)")
    }

    /// Applies the shipped RBAC manifests again, undoing a test's edit of them: the lease's
    /// wipe leaves RBAC objects alone. Blocks.
    pub fn reapply_rbac(&self) -> anyhow::Result<()> {
        apply_rbac(&self.dir.join("admin.kubeconfig"), &self.dir)
    }
}

/// `inner`, with every request made on the plane's runtime. Tests call the admin client
/// from their own runtimes, and hyper opens a connection (its socket and its task) on the
/// runtime that polls the request: once that test's runtime ended, the pooled connection
/// failed the next test's request ("dispatch task is gone", "a Tokio 1.x context was found,
/// but it is being shutdown").
fn on_plane_runtime(inner: kube::Client, plane: tokio::runtime::Handle) -> kube::Client {
    let default_namespace = inner.default_namespace().to_owned();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let sent = plane.spawn(async move { inner.send(request).await });
        async move {
            match sent.await {
                Ok(answer) => answer.map_err(tower::BoxError::from),
                Err(join) => Err(tower::BoxError::from(join)),
            }
        }
    });
    kube::Client::new(service, default_namespace)
}

/// The flags that serve ValidatingAdmissionPolicy (deploy/admission-policy.yaml): GA
/// (`admissionregistration.k8s.io/v1`, on by default) from Kubernetes 1.30; before, beta
/// (`v1beta1`) behind its feature gate and off unless both flags are given. A GA gate is
/// removed a few releases later, and naming an unknown gate stops the server, so they go to
/// older servers only.
fn admission_policy_flags(assets: &Path) -> anyhow::Result<Vec<String>> {
    let output = Command::new(assets.join("kube-apiserver"))
        .arg("--version")
        .output()
        .context("running kube-apiserver --version")?;
    let version = String::from_utf8_lossy(&output.stdout);
    // "Kubernetes v1.28.4"
    let minor = version
        .split_whitespace()
        .last()
        .and_then(|v| v.trim_start_matches('v').split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("reading kube-apiserver's version from {version:?}"))?;
    Ok(if minor < 30 {
        vec![
            "--feature-gates=ValidatingAdmissionPolicy=true".to_owned(),
            "--runtime-config=admissionregistration.k8s.io/v1beta1=true".to_owned(),
        ]
    } else {
        Vec::new()
    })
}

/// Polls `ready` every 100 ms until it holds, the server exits, or [`START_TIMEOUT`].
fn wait_until(
    server: &mut Server,
    waited: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let began = Instant::now();
    while !ready() {
        if server.exited() || began.elapsed() > START_TIMEOUT {
            return Err(server.failure(waited));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn etcd_healthy(port: u16) -> bool {
    let answer = (|| -> std::io::Result<String> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
        tcp.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    answer.is_ok_and(|a| a.contains(r#""health":"true""#))
}

/// Applies the function's and the agent's RBAC manifests from this workspace, as an
/// operator would, so that tests meet exactly the permissions that ship.
fn apply_rbac(kubeconfig: &Path, dir: &Path) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let output = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!(
            "--cache-dir={}",
            dir.join("kubectl-cache").display()
        ))
        .args(["apply", "-f"])
        .arg(root.join("deploy/rbac.yaml"))
        .arg("-f")
        .arg(root.join("cluster-agent/deploy/rbac.yaml"))
        .output()
        .context("running kubectl apply (is kubectl on the PATH?)")?;
    if !output.status.success() {
        bail!(
            "kubectl apply of the RBAC manifests failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Removes the folders of runs whose test process is gone (their watchdogs remove them
/// unless they were killed too).
fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("nth-envtest-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _best_effort = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The cluster's CA, the API server's certificate, and the ServiceAccount signing key.
struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
}

impl Pki {
    fn write(dir: &Path) -> anyhow::Result<Self> {
        let pki = TestPki::generate()?;
        let sa_key = KeyPair::generate()?;
        for (name, content) in [
            ("ca.crt", pki.ca_pem.clone()),
            ("server.crt", pki.server_cert_pem),
            ("server.key", pki.server_key_pem),
            ("sa.key", sa_key.serialize_pem()),
            ("sa.pub", sa_key.public_key_pem()),
        ] {
            std::fs::write(dir.join(name), content).with_context(|| format!("writing {name}"))?;
        }
        Ok(Self {
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der,
        })
    }
}
