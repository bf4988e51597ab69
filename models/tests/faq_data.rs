//! The fetched FAQ data reads in both of its forms and splits by category.

use fedshield_models::Assets;
use fedshield_models::data::{read_instruction_jsonl, split_by_category};

#[test]
fn faq_reads_and_splits_into_three_non_iid_clients() {
    let assets = Assets::locate();
    let alpaca =
        read_instruction_jsonl(&assets.faq_alpaca().expect("run scripts/setup.sh")).unwrap();
    let faq = read_instruction_jsonl(&assets.faq_with_categories().unwrap()).unwrap();
    assert_eq!(alpaca.len(), 503);
    assert_eq!(faq.len(), 503);
    assert_eq!(alpaca[0].instruction, faq[0].instruction);
    assert_eq!(alpaca[0].output, faq[0].output);
    let split = split_by_category(&faq, 3, 0.1, 0).unwrap();
    let sizes: Vec<usize> = split.clients.iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>() + split.eval.len(), 503);
    assert!(
        (40..=60).contains(&split.eval.len()),
        "eval {}",
        split.eval.len()
    );
    assert!(sizes.iter().all(|&n| n > 120), "{sizes:?}");
}
