-- Orthanc routing for lungnode.
--
-- When a study has received no new instance for StableAge seconds, send its CT
-- series that lungnode has not had yet to the DICOM modality "lungnode"
-- (DicomModalities in orthanc.json).  Never sent:
--   * series that are not CT (SR, SEG, OT/SC, PT, ...),
--   * lungnode's own results: Manufacturer exactly "lungnode" (what the node
--     writes into its SR, SEG and summary image), or one of the series
--     descriptions the node writes ("lungnode lung report", "lungnode lung
--     segmentation", "lungnode summary"); compared without regard to case,
--     whatever the modality.  Synthetic studies of `lungnode synth` carry
--     Manufacturer "LUNGNODE SYNTHETIC PHANTOM" and are sent like a scanner's,
--   * series already sent, unless they gained instances since or the send
--     failed (the Orthanc job ended in Failure and is still in the job history,
--     see JobsHistorySize).
-- So the results lungnode stores back into the study (which makes the study
-- stable again) do not start another analysis, while a CT series added later
-- to the same study is sent on its own.
--
-- What was sent is remembered per series as user metadata number 4301 (value
-- "<job id> <instance count>"); Orthanc needs no UserMetadata declaration for
-- it.  Change ROUTED_METADATA if your Orthanc already uses that number.
-- Each decision is printed to Orthanc's log as "lungnode routing: ...".

local TARGET = 'lungnode'          -- the DicomModalities entry of the node
local ROUTED_METADATA = '4301'

local RESULT_MANUFACTURER = 'lungnode'
local RESULT_DESCRIPTIONS = {
   ['lungnode lung report'] = true,
   ['lungnode lung segmentation'] = true,
   ['lungnode summary'] = true,
}

local function IsLungnodeResult(tags)
   local manufacturer = string.lower(tags['Manufacturer'] or '')
   local description = string.lower(tags['SeriesDescription'] or '')
   return manufacturer == RESULT_MANUFACTURER or RESULT_DESCRIPTIONS[description] == true
end

local function JobFailed(jobId)
   -- /jobs lists the jobs Orthanc still knows; asking for an unknown one logs an error
   for _, id in ipairs(ParseJson(RestApiGet('/jobs'))) do
      if id == jobId then
         local job = ParseJson(RestApiGet('/jobs/' .. jobId))
         return job ~= nil and job['State'] == 'Failure'
      end
   end
   return false   -- no longer in the history: counted as delivered
end

-- Why a series must (still) be sent, or nil when it was sent already.
local function ReasonToSend(series)
   local metadata = ParseJson(RestApiGet('/series/' .. series['ID'] .. '/metadata?expand'))
   local routed = metadata[ROUTED_METADATA]
   if routed == nil then
      return 'new'
   end
   local jobId, count = string.match(routed, '^(%S+) (%d+)$')
   if jobId == nil then
      return 'new'
   end
   if #series['Instances'] > tonumber(count) then
      return 'gained instances'
   end
   if JobFailed(jobId) then
      return 'previous send (job ' .. jobId .. ') failed'
   end
   return nil
end

function OnStableStudy(studyId, tags, metadata)
   local studyUid = tags['StudyInstanceUID'] or studyId
   local send = {}
   local reasons = {}
   local skipped = 0
   for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
      local t = series['MainDicomTags']
      if t['Modality'] == 'CT' and not IsLungnodeResult(t) then
         local reason = ReasonToSend(series)
         if reason ~= nil then
            table.insert(send, series)
            table.insert(reasons, (t['SeriesInstanceUID'] or series['ID']) .. ' (' .. reason .. ')')
         else
            skipped = skipped + 1
         end
      end
   end

   if #send == 0 then
      print('lungnode routing: study ' .. studyUid .. ': no new CT series (' .. skipped ..
            ' already sent); not sent')
      return
   end

   local ids = {}
   for _, series in ipairs(send) do
      table.insert(ids, series['ID'])
   end
   local answer = RestApiPost('/modalities/' .. TARGET .. '/store',
                              DumpJson({ Resources = ids, Synchronous = false }, true))
   if answer == nil then
      print('lungnode routing: study ' .. studyUid .. ': could not start sending to ' .. TARGET ..
            ' (is the modality "' .. TARGET .. '" configured?); not sent')
      return
   end
   local jobId = ParseJson(answer)['ID']
   for _, series in ipairs(send) do
      RestApiPut('/series/' .. series['ID'] .. '/metadata/' .. ROUTED_METADATA,
                 jobId .. ' ' .. #series['Instances'])
   end
   print('lungnode routing: study ' .. studyUid .. ': sending ' .. #send .. ' CT series to ' ..
         TARGET .. ' in job ' .. jobId .. ': ' .. table.concat(reasons, ', '))
end
