//! Test certificates of either key type, for trying SNI selection and key types without
//! external tools (the rcgen backend Spooky uses for `self_signed` makes ECDSA keys only).

use boring::asn1::Asn1Time;
use boring::ec::{EcGroup, EcKey};
use boring::error::ErrorStack;
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::rsa::Rsa;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509Builder, X509NameBuilder, X509};
use std::path::Path;

/// A fresh ECDSA P-256 key.
pub fn ecdsa_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

/// A fresh 2048-bit RSA key.
pub fn rsa_key() -> Result<PKey<Private>, ErrorStack> {
    PKey::from_rsa(Rsa::generate(2048)?)
}

/// A self-signed certificate for `names` (DNS SANs; the first is also the subject CN), valid
/// for 30 days.
pub fn self_signed(key: &PKey<Private>, names: &[&str]) -> Result<X509, ErrorStack> {
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, names.first().copied().unwrap_or("localhost"))?;
    let name = name.build();
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(30)?);
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        san.dns(n);
    }
    let san = san.build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build())
}

/// Writes `{stem}.crt` and `{stem}.key` (PEM) in `dir`: a self-signed certificate for `names`.
pub fn write_self_signed(dir: &Path, stem: &str, key: &PKey<Private>, names: &[&str]) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{stem}.crt")), self_signed(key, names)?.to_pem()?)?;
    std::fs::write(dir.join(format!("{stem}.key")), key.private_key_to_pem_pkcs8()?)?;
    Ok(())
}
