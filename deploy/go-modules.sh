# Sourced by deploy/build-binaries.sh and deploy/build-node.sh: Go programs built from the
# module proxy through a wrapper module, without a clone of any repository. The caller
# defines log, die and GO (and exports GOFLAGS=-mod=mod, GOTOOLCHAIN=local, CGO_ENABLED=0).

# go_header <go.mod file>: print its `go` and `godebug` directives (line or block form).
go_header() {
    awk '
        /^go [0-9]/              { print; next }
        /^godebug \(/            { inblk = 1; print; next }
        inblk                    { print; if ($0 ~ /^\)/) inblk = 0; next }
        /^godebug /              { print }
    ' "$1"
}

# mod_download <module@version>: download it, print "<go.mod path> <info path>".
mod_download() {
    local json gomod info
    json=$("$GO" mod download -json "$1") || die "go mod download $1 failed"
    gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
    info=$(sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
    [[ -f $gomod && -f $info ]] || die "go mod download $1: no go.mod/info in: $json"
    echo "$gomod $info"
}

# new_wrapper <dir> <module name> <dependency go.mod>: fresh wrapper module in <dir>.
new_wrapper() {
    local dir=$1 name=$2 depmod=$3
    rm -rf "$dir"
    mkdir -p "$dir"
    { echo "module $name"; echo; go_header "$depmod"; } >"$dir/go.mod"
}

# k8s_wrapper <dir> <module name> <version>: a wrapper module in <dir> for k8s.io/kubernetes
# <version>. The release pins its staging modules at v0.0.0 with `replace => ./staging/src/...`,
# so the wrapper requires k8s.io/kubernetes v1.X.Y and replaces every staging module (read from
# the release's own replace block) with k8s.io/<name> v0.X.Y. Sets K8S_LDFLAGS: the version of
# the servers (k8s.io/component-base/version) and of kubectl's client (k8s.io/client-go),
# like hack/lib/version.sh; gitCommit stays empty (the module proxy does not record it).
k8s_wrapper() {
    local dir=$1 name=$2 version=$3 gomod info build_date minor staging_v n pkg
    [[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "bad FEDFLEET_K8S_VERSION $version"
    minor=${BASH_REMATCH[1]}
    staging_v="v0.${version#v1.}"
    read -r gomod info < <(mod_download "k8s.io/kubernetes@$version")
    [[ -f ${gomod:-} && -f ${info:-} ]] || die "go mod download k8s.io/kubernetes@$version failed"
    build_date=$(sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' "$info")
    [[ -n $build_date ]] || build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    new_wrapper "$dir" "$name" "$gomod"
    local -a staging
    mapfile -t staging < <(awk '
        /^replace \(/ { inblk = 1; next }
        inblk && /^\)/ { inblk = 0; next }
        {
            line = $0; sub(/^replace[[:space:]]+/, "", line)
            if ((inblk || $0 ~ /^replace /) && line ~ /=>[[:space:]]*\.\/staging\/src\//) {
                split(line, f, /[[:space:]]+/); for (i in f) if (f[i] ~ /^k8s\.io\//) { print f[i]; break }
            }
        }' "$gomod" | sort -u)
    ((${#staging[@]} > 10)) || die "found only ${#staging[@]} staging modules in $gomod"
    {
        echo
        echo "require k8s.io/kubernetes $version"
        echo
        echo "replace ("
        for n in "${staging[@]}"; do echo "	$n => $n $staging_v"; done
        echo ")"
    } >>"$dir/go.mod"
    log "kubernetes $version: wrapper $dir/go.mod (${#staging[@]} staging modules at $staging_v)"
    K8S_LDFLAGS="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        K8S_LDFLAGS+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        K8S_LDFLAGS+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
    done
}
