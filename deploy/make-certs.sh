#!/usr/bin/env bash
# Certificates for a TLS dask cluster (scheduler, workers, clients), made with openssl.
#
#   deploy/make-certs.sh DIR [HOSTNAME...]
#
# DIR/ca.pem                     the cluster's certificate authority: give it to everyone
# DIR/cluster.pem, cluster-key.pem   scheduler and workers (--tls-cert / --tls-key)
# DIR/client.pem, client-key.pem     cube-engine run --tls-ca DIR/ca.pem --tls-cert ... --tls-key ...
# DIR/ca-key.pem                 signs more certificates; keep it offline, never mount it
#
# HOSTNAMEs go into the certificates (dask does not check them, other TLS tools may);
# localhost and 127.0.0.1 are always there. Keys are written readable by you only.
set -euo pipefail
dir=${1:?usage: deploy/make-certs.sh DIR [HOSTNAME...]}
shift
mkdir -p "$dir"
umask 077
days=${CERT_DAYS:-365}
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# a config of our own: openssl req needs one and some systems ship none
printf '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = cube-engine\n' > "$work/req.cnf"
printf 'basicConstraints=critical,CA:FALSE\nsubjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' \
  "$san" > "$work/leaf.ext"

openssl req -config "$work/req.cnf" -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
  -nodes -days "$days" -subj "/CN=cube-engine dask CA" -keyout "$dir/ca-key.pem" \
  -out "$dir/ca.pem" -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
for role in cluster client; do
  openssl req -config "$work/req.cnf" -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=cube-engine $role" -keyout "$dir/$role-key.pem" -out "$work/$role.csr"
  openssl x509 -req -in "$work/$role.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/leaf.ext" \
    -out "$dir/$role.pem"
done
chmod 644 "$dir/ca.pem" "$dir/cluster.pem" "$dir/client.pem"
echo "wrote $dir/ca.pem, cluster.pem + cluster-key.pem, client.pem + client-key.pem (keep ca-key.pem offline)"
