//! Nanoseconds per metering event, for each tariff kind and a hybrid. `scripts/bench meter`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paystream::meter::{Meter, MeterConfig, Tariff};
use std::hint::black_box;

fn meter(json: &str) -> Meter {
    let tariff = Tariff::from_json(json).unwrap();
    let mut m = Meter::new(
        &tariff,
        MeterConfig::with_credit_window(1_000_000),
        u128::MAX / 4,
        0,
    )
    .unwrap();
    m.connect(0);
    m
}

fn events(c: &mut Criterion) {
    let mut group = c.benchmark_group("meter_event");
    group.throughput(Throughput::Elements(1));

    let mut m = meter(r#"{"perMessage":{"amount":"3","per":"1000"}}"#);
    let mut now = 0u64;
    group.bench_function("per_message", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(m.try_message(black_box(24), now)).unwrap();
        })
    });

    let mut m = meter(r#"{"perSecond":{"amount":"1","per":"10"}}"#);
    group.bench_function("per_second", |b| {
        b.iter(|| {
            now += 1_000;
            m.heartbeat(now);
            black_box(m.advance(black_box(now)));
        })
    });

    let mut m = meter(r#"{"perByteOut":{"amount":"1","per":"1000000"}}"#);
    group.bench_function("per_byte_out", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(m.try_message(black_box(512), now)).unwrap();
        })
    });

    let mut m = meter(r#"{"perByteIn":{"amount":"1","per":"1000000"}}"#);
    group.bench_function("per_byte_in", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(m.try_bytes_in(black_box(512), now)).unwrap();
        })
    });

    let mut m = meter(
        r#"{"perMessage":{"amount":"3","per":"1000"},"perSecond":{"amount":"1","per":"10"},"perByteOut":{"amount":"1","per":"1000000"},"perByteIn":{"amount":"1","per":"1000000"}}"#,
    );
    group.bench_function("hybrid", |b| {
        b.iter(|| {
            now += 1_000;
            m.heartbeat(now);
            black_box(m.try_message(black_box(24), now)).unwrap();
        })
    });

    let mut m = meter(
        r#"{"perMessage":{"amount":"3","per":"1000"},"perSecond":{"amount":"1","per":"10"},"perByteOut":{"amount":"1","per":"1000000"}}"#,
    );
    group.bench_function("hybrid_with_need_voucher_check", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(m.try_message(black_box(24), now)).unwrap();
            black_box(m.poll_need_voucher(now));
        })
    });
    group.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
