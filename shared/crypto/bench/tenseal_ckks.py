#!/usr/bin/env python3
"""TenSEAL CKKS side of the crypto benchmark, with the reference's (FedShield-LLM) parameters:
poly modulus degree 8192, coefficient moduli [60, 40, 40, 60], scale 2^40.

Called by `cargo run --release -p fedshield-crypto --example crypto_bench`, which writes the
clients' vectors (raw little-endian f32, clients x values) and their weights, and reads the
JSON this script prints. Every client encrypts its weighted vector (client-side weighting, as
ours does), the host sums the ciphertexts, the aggregate is decrypted once.
"""
import argparse
import json
import os
import time

import numpy as np
import tenseal as ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--values", type=int, required=True)
    ap.add_argument("--weights", required=True, help="comma-separated client weights")
    args = ap.parse_args()
    data = np.fromfile(args.input, dtype="<f4").reshape(args.clients, args.values)
    weights = [float(w) for w in args.weights.split(",")]
    assert len(weights) == args.clients

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                     coeff_mod_bit_sizes=[60, 40, 40, 60], n_threads=1)
    ctx.global_scale = 2 ** 40

    encrypt_s = 0.0
    wire_bytes = 0
    cts = []
    for c in range(args.clients):
        weighted = (data[c].astype(np.float64) * weights[c]).tolist()
        t0 = time.perf_counter()
        ct = ts.ckks_vector(ctx, weighted)
        encrypt_s += time.perf_counter() - t0
        blob = ct.serialize()
        wire_bytes += len(blob)
        cts.append(ts.ckks_vector_from(ctx, blob))

    t0 = time.perf_counter()
    agg = cts[0].copy()
    for ct in cts[1:]:
        agg += ct
    aggregate_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    mean = np.array(agg.decrypt(), dtype=np.float64)
    decrypt_s = time.perf_counter() - t0

    want = sum(weights[c] * data[c].astype(np.float64) for c in range(args.clients))
    n = args.clients * args.values
    # TenSEAL prints warnings on stdout: the result is the last line.
    print(json.dumps({
        "encrypt_values_per_s": n / encrypt_s,
        "aggregate_values_per_s": (args.clients - 1) * args.values / aggregate_s,
        "decrypt_seconds": decrypt_s,
        "bytes_per_value": wire_bytes / n,
        "max_abs_error": float(np.max(np.abs(mean - want))),
        "values": args.values,
        "clients": args.clients,
        "threads": 1,
        "tenseal_version": ts.__version__,
    }))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
