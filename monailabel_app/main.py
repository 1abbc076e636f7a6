# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

# The "monaibundle" sample app of MONAI Label 0.8.5 (sample-apps/monaibundle/main.py), Apache License
# 2.0, see LICENSE. Changes (abdoseg): BundleInferTask comes from lib/infers/bundle.py, an unchanged
# copy that does not import torchvision (see there); the infer and train tasks are the subclasses in
# lib/abdoseg_tasks.py (only weight files that fit network_def offered, training stats, displayable
# defaults); the datastores are lib/datastores.py's (stay in their folder, labels checked against
# their image, DICOM SEG with FLARE23 ids, no dcmqi download) and lib/http_guards.py checks /infer
# and /train (unknown model -> 404, image ids only); everything else is the sample app as shipped.

import logging
import os
from typing import Dict

from dicomweb_client import DICOMwebClient
from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials
from dicomweb_client.session_utils import create_session_from_user_pass
from monai.transforms import Invertd, SaveImaged

import monailabel
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.sam2.utils import is_sam2_module_available
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models, strtobool

from lib import http_guards  # abdoseg
from lib.abdoseg_tasks import AbdosegBundleInferTask, AbdosegBundleTrainTask  # abdoseg
from lib.datastores import AbdosegDICOMWebDatastore, AbdosegLocalDatastore, refuse  # abdoseg
from lib.infers.bundle import BundleInferTask  # abdoseg: local copy, see lib/infers/bundle.py

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        self.models = get_bundle_models(app_dir, conf)
        # Add Epistemic model for scoring
        self.epistemic_models = (
            get_bundle_models(app_dir, conf, conf_key="epistemic_model") if conf.get("epistemic_model") else None
        )
        if self.epistemic_models:
            # Get epistemic parameters
            self.epistemic_max_samples = int(conf.get("epistemic_max_samples", "0"))
            self.epistemic_simulation_size = int(conf.get("epistemic_simulation_size", "5"))
            self.epistemic_dropout = float(conf.get("epistemic_dropout", "0.2"))

        self.sam = strtobool(conf.get("sam2", "true"))
        http_guards.install()  # abdoseg
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - Zoo/Bundle ({monailabel.__version__})",
            description="DeepLearning models provided via MONAI Zoo/Bundle",
            version=monailabel.__version__,
        )

    # ----- abdoseg: datastores that stay in their folder, DICOM SEG with FLARE23 ids, no dcmqi
    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            return super().init_datastore()  # -> init_remote_datastore -> _init_dicomweb_datastore below
        logger.info(f"Init Datastore for: {self.studies}")
        return AbdosegLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        # MONAILabelApp._init_dicomweb_datastore of MONAI Label 0.8.5 with abdoseg's datastore class and
        # without the dcmqi download (this app writes and reads DICOM SEG with highdicom/pydicom)
        logger.info(f"Using DICOM WEB: {self.studies}")
        dw_session = None
        if "googleapis.com" in self.studies:
            logger.info("Creating DICOM Credentials for Google Cloud")
            dw_session = create_session_from_gcp_credentials()
            dw_client = DICOMwebClient(url=self.studies, session=dw_session)
        else:
            if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
                dw_session = create_session_from_user_pass(
                    settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
                )
            dw_client = DICOMwebClientX(
                url=self.studies,
                session=dw_session,
                qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
            )
        cache_path = settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
        cache_path = cache_path.strip() if cache_path else ""
        return AbdosegDICOMWebDatastore(
            client=dw_client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache_path if cache_path else None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=True,  # labels are checked against, and SEGs read onto, the image's NIfTI grid
        )

    def _download_dcmqi_tools(self):
        logger.info("dcmqi not needed: DICOM SEG is written and read by abdoseg.dicom.seg (highdicom/pydicom)")

    def infer(self, request, datastore=None):
        # abdoseg: unknown model -> 404; "image" is an image id of the datastore, a path only for the
        # endpoint's own upload / a session's image (http_guards.PATH_ALLOWED)
        model = request.get("model")
        if model not in self._infers:
            raise http_guards.unknown_model(model, self._infers, "inference")
        image = request.get("image")
        if isinstance(image, str) and not (http_guards.PATH_ALLOWED.get() and os.path.isabs(image)):
            ds = datastore if datastore else self.datastore()
            uri = ds.get_image_uri(image)  # 400 for a name that is not a plain id inside the datastore
            if not uri or not os.path.exists(uri):
                raise refuse(404, f"image {image!r} not found in the datastore {ds.name()}")
        return super().infer(request, datastore)

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        #################################################
        # Models
        #################################################

        for n, b in self.models.items():
            if "deepedit" in n:
                # Adding automatic inferer
                i = BundleInferTask(b, self.conf, type="segmentation")
                logger.info(f"+++ Adding Inferer:: {n}_seg => {i}")
                infers[n + "_seg"] = i
                # Adding inferer for managing clicks
                i = BundleInferTask(b, self.conf, type="deepedit")
                logger.info("+++ Adding DeepEdit Inferer")
                infers[n] = i
            else:
                i = AbdosegBundleInferTask(b, self.conf)  # abdoseg
                logger.info(f"+++ Adding Inferer:: {n} => {i}")
                infers[n] = i

        #################################################
        # SAM
        #################################################
        if is_sam2_module_available() and self.sam:
            from monailabel.sam2.infer import Sam2InferTask

            infers["sam_2d"] = Sam2InferTask(model_dir=self.model_dir, type=InferType.DEEPGROW, dimension=2)
            infers["sam_3d"] = Sam2InferTask(model_dir=self.model_dir, type=InferType.DEEPGROW, dimension=3)
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers

        for n, b in self.models.items():
            t = AbdosegBundleTrainTask(b, self.conf)  # abdoseg
            if not t or not t.is_valid():
                continue

            logger.info(f"+++ Adding Trainer:: {n} => {t}")
            trainers[n] = t
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {
            "random": Random(),
            "first": First(),
        }

        logger.info(f"Active Learning Strategies:: {list(strategies.keys())}")
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        methods: Dict[str, ScoringMethod] = {}
        if not self.conf.get("epistemic_model"):
            return methods

        for n, b in self.epistemic_models.items():
            # Create BundleInferTask task with dropout instantiation for scoring inference
            i = BundleInferTask(
                b,
                self.conf,
                train_mode=True,
                skip_writer=True,
                dropout=self.epistemic_dropout,
                post_filter=[SaveImaged, Invertd],
            )
            methods[n] = EpistemicScoring(
                i, max_samples=self.epistemic_max_samples, simulation_size=self.epistemic_simulation_size
            )
            if not methods:
                continue
            methods = methods if isinstance(methods, dict) else {n: methods[n]}
            logger.info(f"+++ Adding Scoring Method:: {n} => {b}")

        logger.info(f"Active Learning Scoring Methods:: {list(methods.keys())}")
        return methods


"""
Example to run train/infer/scoring task(s) locally without actually running MONAI Label Server
"""


def main():
    import argparse
    import shutil
    from pathlib import Path

    from monailabel.utils.others.generic import device_list, file_ext

    os.putenv("MASTER_ADDR", "127.0.0.1")
    os.putenv("MASTER_PORT", "1234")

    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s] [%(process)s] [%(threadName)s] [%(levelname)s] (%(name)s:%(lineno)d) - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )

    home = str(Path.home())
    studies = f"{home}/Datasets/Radiology"

    parser = argparse.ArgumentParser()
    parser.add_argument("-s", "--studies", default=studies)
    parser.add_argument("-m", "--model", default="wholeBody_ct_segmentation")
    parser.add_argument("-t", "--test", default="infer", choices=("train", "infer", "batch_infer"))
    args = parser.parse_args()

    app_dir = os.path.dirname(__file__)
    studies = args.studies
    conf = {
        "models": args.model,
        "preload": "false",
    }

    app = MyApp(app_dir, studies, conf)

    # Infer
    if args.test == "infer":
        sample = app.next_sample(request={"strategy": "first"})
        image_id = sample["id"]
        image_path = sample["path"]

        # Run on all devices
        for device in device_list():
            res = app.infer(request={"model": args.model, "image": image_id, "device": device})
            label = res["file"]
            label_json = res["params"]
            test_dir = os.path.join(args.studies, "test_labels")
            os.makedirs(test_dir, exist_ok=True)

            label_file = os.path.join(test_dir, image_id + file_ext(image_path))
            shutil.move(label, label_file)

            print(label_json)
            print(f"++++ Image File: {image_path}")
            print(f"++++ Label File: {label_file}")
            break
        return

    # Batch Infer
    if args.test == "batch_infer":
        app.batch_infer(
            request={
                "model": args.model,
                "multi_gpu": False,
                "save_label": True,
                "label_tag": "original",
                "max_workers": 1,
                "max_batch_size": 0,
            }
        )
        return

    # Train
    app.train(
        request={
            "model": args.model,
            "max_epochs": 10,
            "dataset": "Dataset",  # PersistentDataset, CacheDataset
            "train_batch_size": 1,
            "val_batch_size": 1,
            "multi_gpu": False,
            "val_split": 0.1,
        },
    )


if __name__ == "__main__":
    # export PYTHONPATH=~/Projects/MONAILabel:`pwd`
    # python main.py
    main()
