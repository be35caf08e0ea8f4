# Sourced by scripts/check-terraform-apply and scripts/check-rules: moto's server on a free
# port, and terraform/ copied into a scratch directory, initialised offline from the local
# provider mirror. The caller sets `work` (a scratch directory it removes) first.
#
#   moto_python          the Python of moto's venv ($NTH_MOTO_SERVER's, else .venv's)
#   start_moto           starts moto_server; sets AWS_ENDPOINT_URL and the test credentials;
#                        stop_moto (run it from the caller's EXIT trap) ends it
#   terraform_ready      0 when terraform and the hashicorp/aws provider mirror are there
#   terraform_copy       copies terraform/ to $work/tf (no .terraform, no state) and inits it
#   dummy_zip PATH       a zip holding a `bootstrap` that exits 1 (never invoked)

moto_server_bin() {
  if [ -n "${NTH_MOTO_SERVER:-}" ]; then
    echo "$NTH_MOTO_SERVER"
  else
    scripts/setup-moto >&2
    echo "$PWD/.venv/bin/moto_server"
  fi
}

moto_python() {
  echo "$(dirname "$(moto_server_bin)")/python"
}

free_port() {
  "$(moto_python)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

moto_pid=
start_moto() {
  local bin port
  bin=$(moto_server_bin)
  port=$(free_port)
  # Managed policies loaded, as AWS has them: a module attaching one must find it.
  MOTO_IAM_LOAD_MANAGED_POLICIES=true "$bin" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
  moto_pid=$!
  local tries=0
  until "$(moto_python)" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$moto_pid" 2>/dev/null; then
      echo "moto_server did not start on port $port:" >&2
      cat "$work/moto.log" >&2
      return 1
    fi
    sleep 0.1
  done
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing
  export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  unset AWS_PROFILE
}

stop_moto() {
  if [ -n "$moto_pid" ]; then
    kill "$moto_pid" 2>/dev/null || true
    wait "$moto_pid" 2>/dev/null || true
    moto_pid=
  fi
}

tf_mirror=${NTH_TF_PLUGIN_MIRROR:-/opt/tf-plugins}

terraform_ready() {
  command -v terraform >/dev/null && [ -d "$tf_mirror/registry.terraform.io/hashicorp/aws" ]
}

terraform_copy() {
  # Our own CLI configuration: the user's may point at registries we cannot reach.
  cat >"$work/terraform.rc" <<RC
provider_installation {
  filesystem_mirror {
    path    = "$tf_mirror"
    include = ["registry.terraform.io/hashicorp/aws"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/aws"]
  }
}
RC
  export TF_CLI_CONFIG_FILE=$work/terraform.rc CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
  mkdir -p "$work/tf"
  (cd terraform && tar --exclude=.terraform --exclude='*.tfstate*' --exclude=.terraform.lock.hcl -cf - .) | (cd "$work/tf" && tar -xf -)
  (cd "$work/tf" && terraform init -backend=false -input=false -no-color >"$work/init.log" 2>&1) || {
    cat "$work/init.log" >&2
    return 1
  }
}

dummy_zip() {
  "$(moto_python)" - "$1" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    info = zipfile.ZipInfo("bootstrap", date_time=(2026, 1, 1, 0, 0, 0))
    info.external_attr = 0o755 << 16
    z.writestr(info, "#!/bin/sh\necho 'a placeholder: this function is never invoked' >&2\nexit 1\n")
PY
}
