#!/usr/bin/env bash
# A test CA and certificates for fleet's MQTT over TLS (mosquitto or the embedded broker).
#
#   deploy/mosquitto/gen-certs.sh OUTDIR [CLIENT_NAME...]
#
# Writes into OUTDIR (created; existing files are never overwritten):
#   ca.pem, ca.key            the CA: agents, the coordinator and fleetctl pin ca.pem
#   server.pem, server.key    the broker: CN and subjectAltName from $SERVER_NAMES
#   NAME.pem, NAME.key        one client certificate per CLIENT_NAME, CN = NAME: with mosquitto's
#                             use_identity_as_username the CN is the username, so a device's
#                             certificate must carry its device id; operators and the
#                             coordinator get theirs the same way
#
# Environment: SERVER_NAMES (default "localhost 127.0.0.1": DNS names and IP addresses the
# broker is reached by), DAYS (default 825), CA_DAYS (default 3650).
#
# EC P-256 keys (PKCS#8 PEM), SHA-256 signatures, X.509 v3 with the extensions rustls checks:
# the CA has basicConstraints CA:TRUE and keyCertSign; the server has subjectAltName and
# serverAuth; clients have clientAuth. For a production fleet use your own PKI: this is for a
# test bed and for the example in this directory. Keep *.key files readable by their user only.
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
names=${SERVER_NAMES:-"localhost 127.0.0.1"}
days=${DAYS:-825}
ca_days=${CA_DAYS:-3650}
command -v openssl >/dev/null || { echo "error: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077

fresh() {
    for f in "$@"; do
        if [ -e "$out/$f" ]; then
            echo "error: $out/$f exists; certificates are never overwritten" >&2
            exit 1
        fi
    done
}

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/$1" 2>/dev/null; }

if [ ! -e "$out/ca.pem" ]; then
    fresh ca.key
    key ca.key
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$ca_days" -subj "/CN=fleet test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$out/ca.pem"
    chmod 644 "$out/ca.pem"
    echo "wrote $out/ca.pem (pin it in every client) and $out/ca.key (keep it offline)"
fi

# sign NAME CN EXTFILE
sign() {
    local name=$1 cn=$2 ext=$3
    fresh "$name.key" "$name.pem"
    key "$name.key"
    openssl req -new -key "$out/$name.key" -subj "/CN=$cn" -out "$out/$name.csr"
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$out/ca.srl" -days "$days" -sha256 -extfile "$ext" \
        -out "$out/$name.pem" 2>/dev/null
    rm -f "$out/$name.csr"
    chmod 644 "$out/$name.pem"
}

ext=$(mktemp)
trap 'rm -f "$ext"' EXIT

if [ ! -e "$out/server.pem" ]; then
    san=""
    for n in $names; do
        if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
    done
    first=${names%% *}
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "${san%,}" >"$ext"
    sign server "$first" "$ext"
    echo "wrote $out/server.pem for ${names}"
fi

printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$ext"
for client in "$@"; do
    sign "$client" "$client" "$ext"
    echo "wrote $out/$client.pem (CN=$client)"
done
