"""Reads one of our SRs with highdicom as a TID 1500 Measurement Report and prints what it found.

Usage: python sr_oracle.py SR.dcm   (prints one JSON object on stdout)

highdicom, not our code, parses the document: if it cannot find the measurement groups, the
finding, the score or the image regions, neither can a viewer built on it.
"""

import json
import sys

import highdicom as hd
from pydicom.sr.coding import Code


def main(path):
    sr = hd.sr.srread(path)
    report = sr.content  # raises if the root is not a TID 1500 Measurement Report
    assert isinstance(report, hd.sr.MeasurementReport), type(report)
    out = {
        "sop_class_uid": str(sr.SOPClassUID),
        "template": str(sr.ContentTemplateSequence[0].TemplateIdentifier),
        "observer_types": [],
        "device_model": None,
        "images": [],
        "regions": [],
    }
    for ctx in report.get_observer_contexts():
        out["observer_types"].append(ctx.observer_type.meaning)
        attrs = ctx.observer_identifying_attributes
        if isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes):
            out["device_model"] = attrs.model_name
            out["device_manufacturer"] = attrs.manufacturer_name
    for group in report.get_image_measurement_groups():
        g = {
            "tracking_identifier": group.tracking_identifier,
            "finding_type": [group.finding_type.value, group.finding_type.scheme_designator],
            "finding_sites": [s.value.value for s in group.finding_sites],
            "measurements": {},
            "evaluations": {},
            "source_images": [
                str(i.referenced_sop_instance_uid) for i in group.source_images
            ],
        }
        for m in group.get_measurements():
            g["measurements"][m.name.meaning] = [m.value, m.unit.value]
        for e in group.get_qualitative_evaluations():
            g["evaluations"][e.name.meaning] = [e.value.value, e.value.meaning]
        out["images"].append(g)
    for group in report.get_planar_roi_measurement_groups():
        roi = group.roi
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
        r = {
            "tracking_identifier": group.tracking_identifier,
            "finding_type": [group.finding_type.value, group.finding_type.scheme_designator],
            "graphic_type": roi.graphic_type.value,
            "graphic_data": roi.value.tolist(),
            "referenced_sop_instance_uid": str(ref.ReferencedSOPInstanceUID),
            "measurements": {
                m.name.meaning: [m.value, m.unit.value] for m in group.get_measurements()
            },
        }
        out["regions"].append(r)
    # The same regions found by concept, as a viewer looking for fracture findings would.
    found = report.get_planar_roi_measurement_groups(
        finding_type=Code("72704001", "SCT", "Fracture")
    )
    out["fracture_regions"] = len(found)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
