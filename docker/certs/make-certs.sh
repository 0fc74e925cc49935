#!/bin/sh
# The compose stack's certificates: a CA made for the stack, and one key pair for
# each part, written into DIR (the `certs` volume, mounted read-only at /certs by
# every part). The compose file's one-shot `certs` service runs it before anything
# else starts; no private key is ever committed.
#
#   sh docker/certs/make-certs.sh DIR
#
# What it writes (certificates 0644, keys 0600 and owned by the user that reads them):
#   ca.pem                      the CA every part trusts
#   zkgate.pem, zkgate-key.pem  the Dispatchers and the Meta Server: the server
#                               certificate of their TLS ports, and the client one a
#                               Dispatcher presents when it follows another shard
#   proxy.pem, proxy-key.pem    the proxy's client certificate
#   envoy.pem, envoy-key.pem    the Envoy sidecar's client certificate (ADS)
#
# The CA's key lives only in a temporary directory while the pairs are signed and
# is then deleted: nothing can sign another certificate for the stack. A DIR that
# already holds ca.pem is left as it is, so restarts keep the certificates;
# `docker compose down -v` drops the volume and the next `up` makes a new set.
#
# ZKGATE_UID (10001, the image's user) and ENVOY_UID (101, the envoy image's
# user) own the keys; CERT_DAYS (365) is how long the certificates are valid.
set -eu

dir=${1:?usage: make-certs.sh DIR}
days=${CERT_DAYS:-365}
zkgate_uid=${ZKGATE_UID:-10001}
envoy_uid=${ENVOY_UID:-101}

if [ -s "$dir/ca.pem" ]; then
    echo "make-certs: $dir already holds the stack's certificates; keeping them"
    exit 0
fi
command -v openssl >/dev/null || { echo "make-certs: needs the openssl command" >&2; exit 1; }

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -subj "/O=zkgate compose/CN=zkgate compose CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>"$work/log" || { cat "$work/log" >&2; exit 1; }

# issue NAME SUBJECT_ALT_NAMES: NAME.pem and NAME-key.pem, signed by the CA, good
# for a server and a client alike.
issue() {
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$2" >"$work/$1.ext"
    openssl req -new -newkey rsa:2048 -nodes -subj "/O=zkgate compose/CN=$1" \
        -keyout "$work/$1-key.pem" -out "$work/$1.csr" 2>"$work/log" \
        || { cat "$work/log" >&2; exit 1; }
    openssl x509 -req -sha256 -days "$days" -in "$work/$1.csr" -CA "$work/ca.pem" \
        -CAkey "$work/ca-key.pem" -CAcreateserial -extfile "$work/$1.ext" \
        -out "$work/$1.pem" 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
}

# Every name the parts dial each other by (compose service names), and the
# container's own loopback for its health check and `docker compose exec`.
issue zkgate "DNS:dispatcher-1,DNS:dispatcher-2,DNS:dispatcher-3,DNS:dispatcher-mesh,DNS:meta,DNS:localhost,IP:127.0.0.1"
issue proxy "DNS:proxy"
issue envoy "DNS:envoy"

mkdir -p "$dir"
chmod 0755 "$dir"
for name in zkgate proxy envoy; do
    cp "$work/$name.pem" "$work/$name-key.pem" "$dir/"
    chmod 0644 "$dir/$name.pem"
    chmod 0600 "$dir/$name-key.pem"
done
chown "$zkgate_uid:$zkgate_uid" "$dir/zkgate-key.pem" "$dir/proxy-key.pem"
chown "$envoy_uid:$envoy_uid" "$dir/envoy-key.pem"
# Last: its presence means the set is whole.
cp "$work/ca.pem" "$dir/ca.pem"
chmod 0644 "$dir/ca.pem"
echo "make-certs: wrote the stack's certificates to $dir"
