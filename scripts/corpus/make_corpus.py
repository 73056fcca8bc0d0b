#!/usr/bin/env python3
"""Planted-identifier corpus for the de-identification tests.

Usage: make_corpus.py OUTDIR

Writes small CR and DX Part 10 files into OUTDIR, two patients, three studies, with identifiers
planted wherever the PS3.15 Basic Profile says they hide: names, IDs, dates, addresses, phone
numbers, physicians, institution and device identity, free-text comments, identifiers nested in
sequences (Request Attributes, Referenced Study, Other Patient IDs, a person name inside a code
sequence item), private tags with names and a private sequence, overlay comments and the file
meta. Also writes OUTDIR/corpus.json:

  planted     every identifying string: none may appear in a de-identified file
  files       per file: name, patient (a key, not a name), transfer syntax
  references  (file, sequence keyword, target file): the reference must follow the target's UID
  uids        every non-standard UID in the corpus: none may survive de-identification

Every value is made up. Needs pydicom 3 (scripts/deid-peers.sh makes a venv with it).
"""
import json
import os
import re
import struct
import sys

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
# A made-up root under the private-enterprise arc; never a real organisation's.
ROOT = "1.3.6.1.4.1.999999.42"

PLANTED = set()


def plant(value, *tokens):
    """Records an identifying value, each component of a person name, and the distinctive
    tokens given (free text is checked by its made-up words, not by common ones)."""
    PLANTED.add(str(value))
    if "^" in str(value):
        PLANTED.update(p for p in str(value).split("^") if p)
    elif not tokens:
        tokens = made_up_words(str(value))
    PLANTED.update(tokens)
    return value


# Ordinary words that may well appear in a de-identified file (our method text, a code meaning).
COMMON = {
    "saint", "memorial", "hospital", "crescent", "close", "orthopaedic", "annex", "lives",
    "prefers", "contact", "cyclist", "series", "patient", "processed", "performed", "ankle",
    "wrist", "glass", "brother", "daughter", "called", "bridge", "stairs", "collided",
}


def made_up_words(text):
    """The capitalised, made-up words of a free-text value: the parts that identify."""
    words = re.findall(r"[A-Za-z][A-Za-z]{4,}", text)
    return [w for w in words if w[0].isupper() and w.lower() not in COMMON]


PATIENTS = {
    "A": {
        "PatientName": "QUORVALLE^BETTRIX^ANSEL",
        "PatientID": "QXP-884213",
        "PatientBirthDate": "19470315",
        "PatientSex": "F",
        "PatientAge": "072Y",
        "PatientWeight": "61.5",
        "PatientSize": "1.62",
        "OtherPatientIDs": "QXP-OLD-55120",
        "OtherPatientNames": "WINTERBRIAR^BETTRIX",
        "PatientBirthName": "ALDERSMOOT^BETTRIX",
        "PatientMotherBirthName": "GREYSTOVALL^MAUDRINE",
        "PatientAddress": "4417 Wendlemoor Crescent Pryceville",
        "PatientTelephoneNumbers": "+1-555-0199-4471",
        "MedicalRecordLocator": "MRL-4471-ZZQ",
        "Occupation": "Kestrel tollkeep",
        "AdditionalPatientHistory": "Lives with daughter Verlaine Quorvalle, fell on Marrowgate stairs",
        "PatientComments": "Prefers to be called Bettsy Brackenholt",
        "ResponsiblePerson": "QUORVALLE^VERLAINE",
        "other_id_seq": "OPID-3371-KQX",
        "alt_calendar_birth": "ALTCAL-5707-TISHREI",
    },
    "B": {
        "PatientName": "THRANDQUIST^MIREYA",
        "PatientID": "ZR-5520719",
        "PatientBirthDate": "19881102",
        "PatientSex": "M",
        "PatientAge": "031Y",
        "PatientWeight": "82",
        "PatientSize": "1.85",
        "OtherPatientIDs": "ZR-ALT-77310",
        "OtherPatientNames": "HOLLENKAMP^MIREYA",
        "PatientBirthName": "VASHTERFELD^MIREYA",
        "PatientMotherBirthName": "ORNSBECK^LILIANE",
        "PatientAddress": "12 Quillfeather Lane Dunmaraig",
        "PatientTelephoneNumbers": "+44-20-7946-0387",
        "MedicalRecordLocator": "MRL-0387-QPV",
        "Occupation": "Fennimore glass",
        "AdditionalPatientHistory": "Cyclist, collided near Ostrowind bridge",
        "PatientComments": "Contact brother Caspian Thrandquist",
        "ResponsiblePerson": "THRANDQUIST^CASPIAN",
        "other_id_seq": "OPID-9120-MZT",
        "alt_calendar_birth": "ALTCAL-5749-HESHVAN",
    },
}

STAFF = {
    "ReferringPhysicianName": "HALLOWTREE^IGNATIUS",
    "ReferringPhysicianAddress": "88 Calloway Drift Pryceville",
    "ReferringPhysicianTelephoneNumbers": "555-0143-7788",
    "PerformingPhysicianName": "BRISENDINE^OONA",
    "NameOfPhysiciansReadingStudy": "CASTELLWAY^PERPETUA",
    "PhysiciansOfRecord": "DUNMORROW^EZEKIEL",
    "OperatorsName": "FELDERHOFF^JUNO",
    "RequestingPhysician": "GAUTHREY^MAXIMO",
    "InstitutionName": "Saint Wystan Memorial Hospital",
    "InstitutionAddress": "1 Wystan Close Pryceville",
    "InstitutionalDepartmentName": "Wystan Orthopaedic Annex",
    "StationName": "WYSTANCR07",
    "DeviceSerialNumber": "SN-77Q4-WX812",
    "DetectorID": "DET-QK4471",
    "PlateID": "PLT-88120Q",
    "CassetteID": "CAS-55190Q",
}

STUDIES = {
    # study key: patient, date, time, accession, study id, description
    "S1": ("A", "20190412", "101500", "ACC99173524", "STU4471932", "XR ANKLE 3V Quorvalle fall"),
    "S2": ("A", "20200130", "143000", "ACC99180077", "STU4471999", "XR ANKLE follow-up Kestrelmouth"),
    "S3": ("B", "20210705", "080500", "ACC55012345", "STU5501234", "XR WRIST Ostrowind collision"),
}

# file name: study, SOP class, instance number, transfer syntax
FILES = {
    "a1_cr.dcm": ("S1", CR, 1, ExplicitVRLittleEndian),
    "a2_dx_proc.dcm": ("S1", DX_PROCESSING, 2, ExplicitVRLittleEndian),
    "a3_dx_pres.dcm": ("S1", DX_PRESENTATION, 3, ExplicitVRLittleEndian),
    "a4_dx_followup.dcm": ("S2", DX_PRESENTATION, 1, ExplicitVRLittleEndian),
    "b1_cr.dcm": ("S3", CR, 1, ExplicitVRLittleEndian),
    "b2_cr_implicit.dcm": ("S3", CR, 2, ImplicitVRLittleEndian),
}


def uid(*parts):
    return ".".join([ROOT] + [str(p) for p in parts])


def study_uid(study):
    return uid(1, int(study[1:]))


def series_uid(study, sop_class):
    return uid(2, int(study[1:]), 1 if sop_class == CR else 2)


def sop_uid(name):
    return uid(3, sorted(FILES).index(name) + 1)


def code_item(value, scheme, meaning):
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make(name):
    study, sop_class, number, syntax = FILES[name]
    patient_key, date, time, accession, study_id, description = STUDIES[study]
    patient = PATIENTS[patient_key]

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid(name)
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.AcquisitionDateTime = date + time + ".250000"
    ds.StudyTime = time
    ds.SeriesTime = time
    ds.AcquisitionTime = time
    ds.ContentTime = time
    ds.AccessionNumber = plant(accession)
    ds.Modality = "CR" if sop_class == CR else "DX"
    if sop_class != CR:
        ds.PresentationIntentType = (
            "FOR PROCESSING" if sop_class == DX_PROCESSING else "FOR PRESENTATION"
        )
    ds.Manufacturer = "Acme Radiography"
    for keyword, value in STAFF.items():
        setattr(ds, keyword, plant(value))
    ds.StudyDescription = plant(description)
    ds.SeriesDescription = plant(f"Series for {patient['PatientName'].split('^')[0].title()}")
    ds.ProtocolName = plant("Wendlemoor ankle protocol", "Wendlemoor")
    ds.ImageComments = plant(f"Patient {patient['PatientName'].split('^')[1].title()} said it hurts")
    ds.DerivationDescription = plant("Processed at Wystan night shift", "Wystan")
    ds.ManufacturerModelName = "RX-9000"

    # A person name nested inside a code sequence item (the table's D, not a pass).
    anatomic = code_item("T-15750", "SRT", "Ankle joint")
    anatomic.PersonName = plant("ULVENBROOK^TEODORA")
    ds.AnatomicRegionSequence = Sequence([anatomic])
    procedure = code_item("RPID17", "LOCAL", "XR ankle")
    procedure.OperatorsName = plant("NESSELRODE^KILIAN")
    ds.ProcedureCodeSequence = Sequence([procedure])

    # Patient module and its neighbours.
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
        "Occupation",
        "AdditionalPatientHistory",
        "PatientComments",
        "ResponsiblePerson",
    ):
        setattr(ds, keyword, plant(patient[keyword]))
    ds.PatientBirthTime = "061500"
    ds.PatientSex = patient["PatientSex"]
    ds.PatientAge = patient["PatientAge"]
    ds.PatientWeight = patient["PatientWeight"]
    ds.PatientSize = patient["PatientSize"]
    ds.IssuerOfPatientID = plant("WYSTAN-MPI-EAST")
    other = Dataset()
    other.PatientID = plant(patient["other_id_seq"])
    other.IssuerOfPatientID = plant("KESTRELMOUTH-CLINIC", "KESTRELMOUTH")
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    # Not in Table E.1-1 but a birth date all the same.
    ds.add_new(0x00100033, "LO", plant(patient["alt_calendar_birth"]))
    ds.AdmissionID = plant(f"ADM-{patient['PatientID'][-5:]}X")

    # General study / series / equipment.
    ds.StudyInstanceUID = study_uid(study)
    ds.SeriesInstanceUID = series_uid(study, sop_class)
    ds.FrameOfReferenceUID = uid(4, int(study[1:]))
    ds.IrradiationEventUID = uid(5, sorted(FILES).index(name) + 1)
    ds.StudyID = plant(study_id)
    ds.SeriesNumber = 1 if sop_class == CR else 2
    ds.InstanceNumber = number
    ds.BodyPartExamined = "ANKLE" if study != "S3" else "WRIST"
    ds.ViewPosition = "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.14, 0.14]
    ds.SoftwareVersions = "4.2"

    # Request Attributes Sequence: IDs and a scheduled performing physician, nested.
    request = Dataset()
    request.RequestedProcedureID = plant(f"RP-{study_id[-5:]}Q")
    request.ScheduledProcedureStepID = plant(f"SPS-{accession[-5:]}Q")
    request.ScheduledProcedureStepDescription = plant("Ankle for Quillfeather follow-up", "Quillfeather")
    request.ScheduledPerformingPhysicianName = plant("HARKWELL^SABLE")
    request.AccessionNumber = accession
    ds.RequestAttributesSequence = Sequence([request])
    ds.RequestedProcedureDescription = plant("Ankle series requested by Hallowtree", "Hallowtree")
    ds.PerformedProcedureStepID = plant(f"PPS-{accession[-5:]}Z")
    ds.PerformedProcedureStepStartDate = date
    ds.PerformedProcedureStepStartTime = time
    ds.PerformedProcedureStepDescription = plant("Performed by Brisendine team", "Brisendine")

    if sop_class == DX_PRESENTATION and name == "a3_dx_pres.dcm":
        # Derived from the For Processing image of the same study.
        src = Dataset()
        src.ReferencedSOPClassUID = DX_PROCESSING
        src.ReferencedSOPInstanceUID = sop_uid("a2_dx_proc.dcm")
        ds.SourceImageSequence = Sequence([src])
    if name == "a4_dx_followup.dcm":
        # The follow-up points back at the first study and at its CR image.
        ref_study = Dataset()
        ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        ref_study.ReferencedSOPInstanceUID = study_uid("S1")
        ds.ReferencedStudySequence = Sequence([ref_study])
        ref_image = Dataset()
        ref_image.ReferencedSOPClassUID = CR
        ref_image.ReferencedSOPInstanceUID = sop_uid("a1_cr.dcm")
        ds.ReferencedImageSequence = Sequence([ref_image])
    if sop_class != CR:
        # DX Acquisition Context (Type 2): a person hidden in an item.
        context = Dataset()
        context.ValueType = "PNAME"
        context.ConceptNameCodeSequence = Sequence([code_item("121008", "DCM", "Person Observer Name")])
        context.PersonName = plant("ACQCONTEXT^WILHELMINA")
        ds.AcquisitionContextSequence = Sequence([context])
        ds.DetectorType = "DIRECT"

    # Private tags: a creator, a name, and a private sequence holding another name.
    block = ds.private_block(0x0009, "ACME_IMAGING 1.0", create=True)
    block.add_new(0x01, "LO", plant("QPRIV-771 copy of Quorvalle chart", "QPRIV-771", "Quorvalle"))
    inner = Dataset()
    inner.PatientName = plant("PRIVATENAME^ZOLTRAVINE")
    block.add_new(0x02, "SQ", Sequence([inner]))

    # An overlay with a comment (60xx,4000): X in the table.
    ds.add_new(0x60004000, "LT", plant("Overlay note Marrowgate", "Marrowgate"))

    # Image pixel module: 16x16, 12 bits stored, a gradient.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = struct.pack("<256H", *[(i * 16) % 4096 for i in range(256)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = uid(9, 1)
    meta.SourceApplicationEntityTitle = plant("WYSTANAE77")
    ds.file_meta = meta
    return ds, patient_key, str(syntax)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_corpus.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    files = []
    uids = set()
    for name in sorted(FILES):
        ds, patient_key, syntax = make(name)
        ds.save_as(os.path.join(out, name), enforce_file_format=True)
        files.append({"name": name, "patient": patient_key, "transfer_syntax": syntax})

        def collect(d):
            for elem in d:
                if elem.VR == "UI" and str(elem.value).startswith(ROOT):
                    uids.add(str(elem.value))
                elif elem.VR == "SQ":
                    for item in elem.value:
                        collect(item)

        collect(ds)
    for patient in PATIENTS.values():
        plant(patient["PatientBirthDate"])
    references = [
        {"file": "a3_dx_pres.dcm", "sequence": "SourceImageSequence", "target": "a2_dx_proc.dcm"},
        {"file": "a4_dx_followup.dcm", "sequence": "ReferencedImageSequence", "target": "a1_cr.dcm"},
    ]
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(
            {
                "planted": sorted(PLANTED),
                "files": files,
                "references": references,
                "uids": sorted(uids),
            },
            f,
            indent=1,
        )
    print(out)


if __name__ == "__main__":
    main()
